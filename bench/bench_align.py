"""Benchmark: align one randomly initialized CIFAR ResNet-18 to another (git re-basin).

Compares ``sane_ray.weights.align.match_weights`` with the plain loop
(``align.reference_matching`` in float32: every group re-permutes the original model tensors and rebuilds
``A`` from scratch, float32, same random group order per seed), and reports the median
time, sweeps, L2 distance before/after, whether both found the same permutations, the
function-preservation error, matmul GFLOP (counted by torch.profiler, a measure of work
that does not depend on how busy the machine is) and peak RSS. Torch uses 2 threads.
Times are the minimum over ``--repeats`` runs per seed (the machine may be shared), and
the median of those over seeds.

    python bench/bench_align.py [--arch resnet18] [--seeds 7] [--repeats 3] [--no-naive]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Mapping

import torch
from torch.profiler import ProfilerActivity, profile

from sane_ray.weights.align import match_weights, reference_matching
from sane_ray.weights.permutation import (
    apply_permutation,
    permutation_spec,
)
from sane_ray.zoo.architectures import build_model, input_shape


def l2(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def random_model(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """Default init plus a few train-mode forwards, so BN running stats are not constant."""
    torch.manual_seed(seed)
    model = build_model(arch)
    with torch.no_grad():
        model.train()(torch.randn(8, *input_shape(arch)))
    return model.state_dict()


def logits_error(arch: str, sd: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor]) -> float:
    model = build_model(arch).eval()
    x = torch.randn(4, *input_shape(arch), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.load_state_dict(sd)
        y = model(x)
        model.load_state_dict(aligned)
        return float((model(x) - y).abs().max() / y.abs().max())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops() -> float:
    """Current matmul throughput: shows how busy a shared machine is while timing."""
    a, b = torch.randn(512, 4608), torch.randn(512, 4608)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b.T
    return 10 * 2 * 512 * 512 * 4608 / (time.perf_counter() - t0) / 1e9


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Minimum wall and CPU seconds over ``repeats`` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def matmul_gflop(fn) -> float:
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    return sum(e.flops for e in prof.key_averages()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--seeds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = permutation_spec(args.arch)
    n_params = sum(p.numel() for p in build_model(args.arch).parameters())
    print(f"{args.arch}: {n_params / 1e6:.2f}M params, {len(spec.group_sizes)} groups, "
          f"torch threads {torch.get_num_threads()}")

    # warm up BLAS and scipy so the first seed is not charged for it
    warm = random_model(args.arch, 999)
    match_weights(spec, warm, warm, max_sweeps=1)
    pairs = [(random_model(args.arch, 2 * seed), random_model(args.arch, 2 * seed + 1)) for seed in range(args.seeds)]
    rss_before = peak_rss_mib()
    print(f"machine: load average {os.getloadavg()[0]:.1f}, 512x4608x512 matmul at {matmul_gflops():.0f} GFLOP/s")

    rows = []
    for seed, (ref, sd) in enumerate(pairs):  # phase 1: timing only, so peak RSS is the optimized path's
        t_fast, c_fast, result = timed(lambda: match_weights(spec, ref, sd, seed=seed), args.repeats)
        rows.append(
            {"seed": seed, "fast_s": t_fast, "fast_cpu_s": c_fast, "fast_sweeps": result.sweeps, "perms": result.perms}
        )
    rss_fast = peak_rss_mib()
    print(f"machine: load average {os.getloadavg()[0]:.1f}, 512x4608x512 matmul at {matmul_gflops():.0f} GFLOP/s")

    for row, (ref, sd) in zip(rows, pairs):  # phase 2: quality, work, and the naive loop
        seed, perms = row["seed"], row.pop("perms")
        aligned = apply_permutation(sd, spec, perms)
        row.update(
            fast_gflop=matmul_gflop(lambda: match_weights(spec, ref, sd, seed=seed)),
            l2_before=l2(ref, sd), l2_fast=l2(ref, aligned), logit_err=logits_error(args.arch, sd, aligned),
        )
        if not args.no_naive:
            naive = lambda: reference_matching(spec, ref, sd, seed=seed, dtype=torch.float32)  # noqa: E731
            t_naive, c_naive, (naive_perms, naive_sweeps) = timed(naive, args.repeats)
            row.update(naive_s=t_naive, naive_cpu_s=c_naive, naive_gflop=matmul_gflop(naive), naive_sweeps=naive_sweeps)
            row["l2_naive"] = l2(ref, apply_permutation(sd, spec, naive_perms))
            row["same_perms"] = all(torch.equal(naive_perms[g], perms[g]) for g in spec.group_sizes)
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"optimized: median {med('fast_s'):.3f} s (CPU {med('fast_cpu_s'):.3f} s, {med('fast_gflop'):.1f} GFLOP), "
          f"sweeps {[r['fast_sweeps'] for r in rows]}, L2 {med('l2_before'):.2f} -> {med('l2_fast'):.2f} (median), "
          f"max rel. logit error {max(r['logit_err'] for r in rows):.1e}")
    if not args.no_naive:
        print(f"naive:     median {med('naive_s'):.3f} s (CPU {med('naive_cpu_s'):.3f} s, "
              f"{med('naive_gflop'):.1f} GFLOP), "
              f"sweeps {[r['naive_sweeps'] for r in rows]}, L2 -> {med('l2_naive'):.2f} (median); "
              f"speed-up {med('naive_s') / med('fast_s'):.1f}x; "
              f"identical permutations in {sum(r['same_perms'] for r in rows)}/{len(rows)} seeds; "
              f"L2 optimized - naive: {[round(r['l2_fast'] - r['l2_naive'], 4) for r in rows]}")
    print(f"peak RSS {rss_before:.0f} MiB with the models loaded, {rss_fast:.0f} MiB after the optimized alignments")


if __name__ == "__main__":
    main()
