"""Sampling benchmarks: the per-token KDE draw at ResNet-18 size, and candidates/s end to end on digits.

KDE (issue 10's target: <= 0.3 s, <= 1.2 GB peak; the reference's per-token scikit-learn KDE:
27.7 s, 5.4 GB): 50 candidates from 10 prompts over 39,304 tokens x 128 latent dims, float32,
independent draws per token. Peak memory is the growth of the process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the draw, measured on the first draw
before anything else large is allocated (tracemalloc does not see torch's allocations).

End to end (``--run``): :func:`~sane_ray.sample.job.run_sample` on a local Ray cluster of
``--cpus`` CPUs, no fine-tuning, no novelty; candidates/s is the sampling phase (draw,
haloed decode, BN-condition, score on validation and test, write) over its wall time.

    python bench/bench_sample.py                     # the KDE draw only
    python bench/bench_sample.py --run /tmp/runs-sample/digits-half --prompt-epoch 10
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import torch

from sane_ray.sample.kde import TokenKDE


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_kde(prompts: int, tokens: int, dim: int, candidates: int, repeats: int, threads: int) -> None:
    torch.manual_seed(0)
    kde = TokenKDE.fit(torch.randn(prompts, tokens, dim), "silverman", anchor="token")
    seeds = list(range(candidates))
    before = _maxrss_mib()
    t0 = time.perf_counter()
    out = kde.sample(seeds, threads=threads)
    first = time.perf_counter() - t0
    peak = _maxrss_mib() - before
    times = [first]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        kde.sample(seeds, out=out, threads=threads)
        times.append(time.perf_counter() - t0)
    gib = out.numel() * 4 / 2**30
    print(f"KDE draw {candidates} x {tokens} x {dim} from {prompts} prompts, {threads} thread(s): "
          f"median {statistics.median(times):.3f} s (min {min(times):.3f}, first {first:.3f}, {repeats} runs); "
          f"peak RSS growth {peak:.0f} MiB (output {gib:.2f} GiB)")


def bench_end_to_end(args: argparse.Namespace) -> None:
    from sane_ray.cluster import ensure_ray
    from sane_ray.sample.config import SampleConfig
    from sane_ray.sample.job import run_sample

    ensure_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.e2e_repeats):
            cfg = SampleConfig(run=args.run, task=args.task, prompt_epoch=args.prompt_epoch, candidates=args.e2e,
                               keep=min(10, args.e2e), finetune_epochs=0, novelty=False, seed=i,
                               kde_anchor="model", bandwidth=0.05, out=f"{out}/r{i}",
                               candidates_per_task=max(1, args.e2e // args.cpus))
            s = run_sample(cfg)
            print(f"end to end run {i}: {s['candidates']} candidates in {s['sample_s']:.1f} s = "
                  f"{s['candidates_per_s']:.2f} candidates/s ({args.cpus} CPUs, {args.cpus} tasks)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--tokens", type=int, default=39_304)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", default="", help="an exported digits run: also measure candidates/s end to end")
    p.add_argument("--task", default="digits")
    p.add_argument("--prompt-epoch", type=int, default=None)
    p.add_argument("--e2e", type=int, default=50, help="candidates of the end-to-end run")
    p.add_argument("--e2e-repeats", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bench_kde(args.prompts, args.tokens, args.dim, args.candidates, args.repeats, args.threads)
    if args.run:
        bench_end_to_end(args)


if __name__ == "__main__":
    main()
