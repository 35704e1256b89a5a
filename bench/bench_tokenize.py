"""Tokenization speed and exactness on a CIFAR ResNet-18 state dict (token size 288).

Times tokenize / detokenize of one model (median of several runs, BN excluded and
included), a stacked batch of checkpoints, and token-space de-standardization; checks
the round trip is exact; prints throughput and peak RSS.

    python bench/bench_tokenize.py [--num-classes 10] [--threads 2] [--runs 9] [--stack 8]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import detokenize, detokenize_stack, tokenize, tokenize_stack
from sane_ray.zoo.architectures import build_model


@dataclass(frozen=True)
class Timing:
    """Wall-clock median and min, and median CPU time (all threads): a shared machine is noisy."""

    median: float
    min: float
    cpu: float

    def __str__(self) -> str:
        return f"median {self.median * 1e3:7.1f} ms (min {self.min * 1e3:.1f} ms, CPU {self.cpu * 1e3:.1f} ms)"


def timed(fn: Callable[[], object], runs: int) -> Timing:
    fn()  # warm-up (builds and caches the layout's index tensors)
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Timing(statistics.median(wall), min(wall), statistics.median(cpu))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--token-size", type=int, default=288)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--stack", type=int, default=8, help="checkpoints tokenized at once in the batched path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sd = build_model("resnet18", num_classes=args.num_classes).state_dict()
    n_params = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    print(f"ResNet-18 (CIFAR, {args.num_classes} classes): {n_params:,} floating entries, "
          f"d_t={args.token_size}, torch threads={torch.get_num_threads()}")

    for include_bn in (False, True):
        t = tokenize(sd, args.token_size, include_bn)
        back = detokenize(t.tokens, t.layout, bn_state=t.bn_state)
        exact = list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        if not exact:
            raise SystemExit(f"round trip is NOT exact (include_bn={include_bn})")
        t_tok = timed(lambda bn=include_bn: tokenize(sd, args.token_size, bn), args.runs)
        t_detok = timed(lambda t=t: detokenize(t.tokens, t.layout), args.runs)
        mb = t.tokens.numel() * 4 / 2**20
        print(f"include_bn={include_bn!s:5}: {t.layout.num_tokens:,} tokens ({mb:.0f} MiB), "
              f"{int(t.mask.sum()):,} real entries, exact round trip: {exact}")
        print(f"  tokenize   {t_tok}: {1 / t_tok.median:.1f} models/s, {mb / t_tok.median:.0f} MiB/s of tokens")
        print(f"  detokenize {t_detok}: {1 / t_detok.median:.1f} models/s")

    stats = StandardizationStats.from_models([sd])
    t = tokenize(sd, args.token_size)
    t_inv = timed(lambda: stats.invert_tokens(t.tokens, t.layout), args.runs)
    print(f"invert_tokens (de-standardize decoded tokens, BN excluded) {t_inv}")

    checkpoints = [{k: v + 0.01 * i if v.is_floating_point() else v for k, v in sd.items()} for i in range(args.stack)]
    stacked = tokenize_stack(checkpoints, args.token_size)
    back = detokenize_stack(stacked.tokens, stacked.layout)
    if not all(torch.equal(back[k][i], checkpoints[i][k]) for k in back for i in range(args.stack)):
        raise SystemExit("stacked round trip is NOT exact")
    t_stack = timed(lambda: tokenize_stack(checkpoints, args.token_size), max(3, args.runs // 3))
    print(f"tokenize_stack of {args.stack} checkpoints (BN excluded) {t_stack}: "
          f"{args.stack / t_stack.median:.1f} models/s, exact round trip: True")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
