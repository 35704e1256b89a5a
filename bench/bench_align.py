"""Benchmark weight matching (git re-basin) on realistic pairs, against the plain loop.

Cases (``--cases``):

* ``resnet100``: two CIFAR ResNet-18s with 100 classes (11.2M parameters), default init,
  BatchNorm weights ``1 + 0.2 N(0,1)`` and biases ``0.2 N(0,1)``, running statistics from
  three train-mode forward passes on CIFAR-like inputs (8x8 Gaussian noise upsampled to
  32x32 plus pixel noise: spatially correlated, like images). The pair the issue timed.
* ``digits_bn``: pairs of *trained* ``cnn_digits_bn`` models (a small BN CNN zoo trained
  in-process with the zoo generator's ``train_model``; cached under
  ``$SANE_RAY_CACHE/bench/align-digits-bn``).
* ``vit_digits``: pairs of trained ``vit_digits`` models (tiny ViTs, same way; cached
  under ``$SANE_RAY_CACHE/bench/align-vit-digits``): heads, MLP units and the residual stream.
* ``resnet10``: the former case, 10 classes, untouched BatchNorm affine weights.

Per pair (seed ``s``: models ``2s`` and ``2s+1``, group order seed ``s``): wall time of
``match_weights`` (median of ``--repeats``), its CPU time, sweeps, L2 distance before and
after, and the plain loop (``align.reference_matching``: every ``A`` rebuilt from the
original tensors, one dense scipy solve per group visit) in float32 and, with
``--float64``, float64: its time and whether its permutations equal the optimized ones.
Summaries give the median and the min-max spread over seeds. ``--profile`` adds a
cProfile (CPU time, one pair per case) split into assignment solves, matrix products,
gathers and the rest. Torch uses ``--threads`` threads (default 2).

    python bench/bench_align.py [--cases resnet100 digits_bn] [--seeds 5] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sane_ray.weights.align import match_weights, reference_matching
from sane_ray.weights.permutation import (
    PermutationSpec,
    apply_permutation,
    permutation_spec,
)
from sane_ray.zoo.architectures import build_model

StateDict = dict[str, torch.Tensor]


def l2(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def cifar_like(n: int, gen: torch.Generator) -> torch.Tensor:
    """Spatially correlated 32x32 RGB inputs: upsampled coarse noise plus pixel noise."""
    coarse = F.interpolate(torch.randn(n, 3, 8, 8, generator=gen), size=32, mode="bilinear", align_corners=False)
    return coarse + 0.3 * torch.randn(n, 3, 32, 32, generator=gen)


def resnet_member(seed: int, num_classes: int, perturb_bn: bool) -> StateDict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model("resnet18", num_classes=num_classes)
    with torch.no_grad():
        if perturb_bn:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        model.train()
        for _ in range(3):
            model(cifar_like(16, gen))
    return model.state_dict()


def trained_zoo(arch: str, models: int, epochs: int) -> list[StateDict]:
    """Final weights of ``models`` trained ``arch`` models on digits (trained once, then read from the cache)."""
    from safetensors.torch import load_file

    from sane_ray.storage import cache_dir
    from sane_ray.zoo.plan import ZooGenConfig, plan_models
    from sane_ray.zoo.trainer import train_model
    from sane_ray.zoo.native import checkpoint_path
    from sane_ray.zoo.tasks import get_task

    root = os.path.join(cache_dir(), "bench", f"align-{arch.replace('cnn_', '').replace('_', '-')}-{epochs}ep")
    cfg = ZooGenConfig(out=root, arch=arch, models=models, epochs=epochs)
    task = None
    out = []
    for plan in plan_models(cfg):
        path = os.path.join(root, checkpoint_path(plan.model_id, epochs))
        if not os.path.exists(path):
            task = task or get_task(cfg.task, cfg.split_seed)
            train_model(plan, task, root)
        out.append(load_file(path))
    return out


def make_pairs(case: str, seeds: int, digits_epochs: int) -> tuple[PermutationSpec, list[tuple[StateDict, StateDict]]]:
    if case == "resnet100":
        members = [resnet_member(s, 100, True) for s in range(2 * seeds)]
        spec = permutation_spec("resnet18", num_classes=100)
    elif case == "resnet10":
        members = [resnet_member(s, 10, False) for s in range(2 * seeds)]
        spec = permutation_spec("resnet18")
    elif case == "digits_bn":
        members = trained_zoo("cnn_digits_bn", 2 * seeds, digits_epochs)
        spec = permutation_spec("cnn_digits_bn")  # activation and dropout p do not change the keys
    elif case == "vit_digits":
        members = trained_zoo("vit_digits", 2 * seeds, digits_epochs)
        spec = permutation_spec("vit_digits")
    else:
        raise SystemExit(f"unknown case {case!r}; known: resnet100, resnet10, digits_bn, vit_digits")
    pairs = [(members[2 * s], members[2 * s + 1]) for s in range(seeds)]
    return spec, pairs


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds over ``repeats`` calls, and the last result."""
    walls, cpus = [], []
    out = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def matmul_gflops() -> float:
    """Current 512x4608x512 matmul throughput: how busy the shared machine is."""
    a, b = torch.randn(512, 4608), torch.randn(512, 4608)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b.T
    return 10 * 2 * 512 * 512 * 4608 / (time.perf_counter() - t0) / 1e9


# cProfile function names -> where the time goes
BUCKETS = {
    "dense assignment (scipy linear_sum_assignment)": ("linear_sum_assignment",),
    "sparse assignment (scipy LAPJVsp) + candidate selection": (
        "min_weight_full_bipartite_matching", "topk", "_sparse_candidate", "nonzero", "csr"),
    "optimality proofs (Bellman-Ford)": ("prove_optimal", "amax", "maximum", "equal"),
    "matrix products (full + low-rank delta)": ("full", "delta"),
    "gathers (index_select)": ("index_select",),
}


def profile_split(fn: Callable[[], object]) -> dict[str, float]:
    """CPU seconds per bucket (by function self time) of one call."""
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    out = dict.fromkeys(BUCKETS, 0.0)
    out["other"] = 0.0
    for (_, _, name), (_, _, tottime, _, _) in stats.items():
        bucket = next((b for b, names in BUCKETS.items() if any(n in name for n in names)), "other")
        out[bucket] += tottime
    return out


def run_case(case: str, args: argparse.Namespace) -> None:
    spec, pairs = make_pairs(case, args.seeds, args.digits_epochs)
    print(f"\n== {case}: {spec.name}, {len(spec.group_sizes)} groups, sizes "
          f"{sorted(set(spec.group_sizes.values()))}; {len(pairs)} pairs", flush=True)
    match_weights(spec, *pairs[0], max_sweeps=1)  # warm up BLAS and scipy
    print(f"   load average {os.getloadavg()[0]:.1f}, 512x4608x512 matmul at {matmul_gflops():.0f} GFLOP/s")
    rows = []
    for seed, (ref, sd) in enumerate(pairs):
        wall, cpu, res = timed(lambda ref=ref, sd=sd, seed=seed: match_weights(spec, ref, sd, seed=seed), args.repeats)
        aligned = apply_permutation(sd, spec, res.perms)
        row = {"seed": seed, "fast_s": wall, "fast_cpu_s": cpu, "sweeps": res.sweeps,
               "l2_before": l2(ref, sd), "l2_after": l2(ref, aligned)}
        plain_dtypes = [torch.float32] + ([torch.float64] if args.float64 else [])
        for dtype in plain_dtypes:
            tag = "plain32" if dtype == torch.float32 else "plain64"
            p_wall, p_cpu, (perms, sweeps) = timed(
                lambda ref=ref, sd=sd, seed=seed, dtype=dtype: reference_matching(spec, ref, sd, seed=seed, dtype=dtype),
                args.plain_repeats)
            row[f"{tag}_s"] = p_wall
            row[f"{tag}_cpu_s"] = p_cpu
            row[f"{tag}_sweeps"] = sweeps
            row[f"{tag}_same"] = all(torch.equal(perms[g], res.perms[g]) for g in spec.group_sizes)
        rows.append(row)
        print("   " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)

    def spread(key: str) -> str:
        vals = [r[key] for r in rows]
        return f"{statistics.median(vals):.3f} s (min {min(vals):.3f}, max {max(vals):.3f})"

    print(f"   optimized: median {spread('fast_s')}, CPU median {statistics.median(r['fast_cpu_s'] for r in rows):.3f} s,"
          f" sweeps {[r['sweeps'] for r in rows]}, L2 {statistics.median(r['l2_before'] for r in rows):.2f} -> "
          f"{statistics.median(r['l2_after'] for r in rows):.2f} (median)")
    for tag in ("plain32", "plain64"):
        if f"{tag}_s" in rows[0]:
            speedup = statistics.median(r[f"{tag}_s"] for r in rows) / statistics.median(r["fast_s"] for r in rows)
            print(f"   {tag}:   median {spread(f'{tag}_s')}, sweeps {[r[f'{tag}_sweeps'] for r in rows]}, "
                  f"same permutations as optimized in {sum(r[f'{tag}_same'] for r in rows)}/{len(rows)}; "
                  f"optimized is {speedup:.1f}x faster (CPU time: "
                  f"{statistics.median(r[f'{tag}_cpu_s'] for r in rows) / statistics.median(r['fast_cpu_s'] for r in rows):.1f}x)")
    if args.profile:
        ref, sd = pairs[0]
        split = profile_split(lambda: match_weights(spec, ref, sd, seed=0))
        total = sum(split.values())
        print(f"   profile (pair 0, CPU s, cProfile overhead included): total {total:.3f}")
        for name, t in split.items():
            print(f"     {name:58s} {t:6.3f}  {t / total:5.1%}")
    print(f"   load average at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["resnet100", "digits_bn"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-repeats", type=int, default=1)
    parser.add_argument("--float64", action="store_true", help="also time the plain loop in float64")
    parser.add_argument("--digits-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    for case in args.cases:
        run_case(case, args)


if __name__ == "__main__":
    main()
