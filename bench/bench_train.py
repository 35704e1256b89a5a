"""Pretraining throughput: the same step inside Ray Train, in a plain process, and FSDP2 on one gloo rank.

Model: a preset (default ``reference``: d_model 256, 4+4 layers, 4 heads, d_z 64,
window 32, d_t 289), batch 32 per worker, both views, synthetic windows. Tokens are
``batch * window * 2 views`` per worker and step. Every figure is the MEDIAN epoch of
``--epochs`` epochs of ``--steps`` steps after one warm-up epoch (not the fastest).

* ``outside``: ``compute_loss`` + ``optimizer_step`` in this process, no Ray: ``plain``
  (the model as is) and ``fsdp1`` (FSDP2 on a one-rank gloo process group, which is
  what a one-worker Ray Train run executes), each in fp32 and bf16 (``--precisions``).
  bf16 is CPU autocast without FSDP, FSDP2's bf16 param dtype with it (fp32 master
  weights and reduction either way). The loss curves of bf16 and fp32 from the same seed
  are compared with the run-to-run noise of fp32 (two fp32 runs whose noise draws differ).
* ``ray``: ``train_sane`` with 1 (and ``--workers``) FSDP2 workers in Ray Train,
  the precision ``select_runtime`` picks for CPU (``TrainConfig.mixed_precision``).

Target (issue 13): one worker in Ray Train >= 4,700 tokens/s (1.5x the reference
implementation's 3,131 tokens/s for this configuration, measured on this machine class)
and within 10% of the same step outside Ray.

    python bench/bench_train.py [--parts outside ray] [--workers 1 2] [--steps 20] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

TARGET_TOKENS_PER_S = 4700.0
REFERENCE_TOKENS_PER_S = 3131.0  # the reference implementation, issue 13, same machine class


def outside_ray(cfg, precision: str, fsdp: bool, steps: int, epochs: int, noise_seed: int = 0) -> dict:
    """Median-epoch tokens/s and the per-step loss curve of the step loop in this process."""
    import torch.distributed as dist

    from sane_ray.model.sane import SaneModel
    from sane_ray.train.fsdp import apply_fsdp, data_parallel_mesh
    from sane_ray.train.optim import build_optimizer
    from sane_ray.train.runtime import Runtime
    from sane_ray.train.step import compute_loss, optimizer_step
    from sane_ray.train.synthetic import synthetic_batch

    # as in the train loop: the step never modifies the FSDP module's output views in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    runtime = Runtime("cpu", "gloo", dtype, torch.float32)
    torch.manual_seed(cfg.seed)
    model = SaneModel(cfg.model)
    if fsdp:
        with tempfile.NamedTemporaryFile() as f:
            dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
        apply_fsdp(model, data_parallel_mesh("cpu", 1), runtime.param_dtype, runtime.reduce_dtype)
    total = steps * (epochs + 1)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total)
    batches = [{k: torch.from_numpy(v) for k, v in
                synthetic_batch(np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size), cfg.model).items()}
               for i in range(steps)]
    noise = torch.Generator().manual_seed(noise_seed)
    tokens = 2 * cfg.batch_size * cfg.model.window_size * steps
    rates, losses = [], []
    model.train()
    try:
        for _ in range(epochs + 1):
            t0 = time.perf_counter()
            for batch in batches:
                parts = compute_loss(model, batch, cfg.model, runtime, None, noise, autocast=not fsdp)
                optimizer_step(parts.total, model, optimizer, scheduler, cfg.optim.grad_clip)
                losses.append(float(parts.total.detach()))
            rates.append(tokens / (time.perf_counter() - t0))
    finally:
        if fsdp:
            dist.destroy_process_group()
    return {"tokens_per_s": statistics.median(rates[1:]), "epochs": rates[1:], "losses": losses}


def run_outside(cfg, args) -> dict[tuple[str, str], float]:
    print(f"\noutside Ray (one process, {torch.get_num_threads()} threads), median of {args.epochs} epochs "
          f"x {args.steps} steps after one warm-up epoch; load {os.getloadavg()[0]:.1f}")
    results, curves = {}, {}
    for mode in ("plain", "fsdp1"):
        for precision in args.precisions:
            r = outside_ray(cfg, precision, mode == "fsdp1", args.steps, args.epochs)
            results[(mode, precision)] = r["tokens_per_s"]
            curves[(mode, precision)] = r["losses"]
            print(f"  {mode:6s} {precision:5s} {r['tokens_per_s']:8,.0f} tokens/s (epochs: "
                  + ", ".join(f"{x:,.0f}" for x in r["epochs"]) + f"), load {os.getloadavg()[0]:.1f}", flush=True)
    if "bf16" in args.precisions and "fp32" in args.precisions:
        again = outside_ray(cfg, "fp32", False, args.steps, args.epochs, noise_seed=1)["losses"]
        fp32, bf16 = np.array(curves[("plain", "fp32")]), np.array(curves[("plain", "bf16")])
        noise = np.abs(np.array(again) - fp32)
        diff = np.abs(bf16 - fp32)
        print(f"  loss curve over {len(fp32)} steps: fp32 {fp32[0]:.4f} -> {fp32[-1]:.4f}, bf16 {bf16[0]:.4f} -> "
              f"{bf16[-1]:.4f}; |bf16 - fp32| mean {diff.mean():.4f} (max {diff.max():.4f}) vs fp32 run-to-run "
              f"(other noise seed) mean {noise.mean():.4f} (max {noise.max():.4f})")
    return results


def run_ray(cfg_kwargs: dict, model, args) -> dict[int, float]:
    import ray

    from sane_ray.train import TrainConfig, train_sane
    from sane_ray.train.runtime import select_runtime
    from sane_ray.train.synthetic import synthetic_dataset

    ray.init(num_cpus=max(4, 2 * args.cores), object_store_memory=600 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    num_windows = args.steps * args.batch_size * max(args.workers)
    train = synthetic_dataset(num_windows, model, num_blocks=8).materialize()
    precision = select_runtime(False, cfg_kwargs.get("mixed_precision", True)).param_dtype
    print(f"\nRay Train + FSDP2, CPU precision {precision}; median of epochs 2..{args.epochs + 1}")
    print(f"{'workers':>7} {'threads/w':>9} {'tokens/s':>10} {'epochs':>28} {'data wait':>9} {'peak RSS/w':>11} "
          f"{'wall s':>7} {'load':>5}")
    rows = {}
    with tempfile.TemporaryDirectory() as storage:
        for workers in args.workers:
            threads = max(1, args.cores // workers)
            cfg = TrainConfig(model=model, epochs=args.epochs + 1, batch_size=args.batch_size,
                              steps_per_epoch=args.steps, num_threads=threads, **cfg_kwargs)
            ds = train.limit(args.steps * args.batch_size * workers)  # `steps` batches per worker
            start = time.perf_counter()
            result = train_sane(cfg, {"train": ds}, storage, f"bench-{workers}w", num_workers=workers,
                                     resources_per_worker={"CPU": threads}, controller_failure_limit=0)
            wall = time.perf_counter() - start
            hist = result.return_value[1:]
            rate = statistics.median(h["tokens_per_s"] for h in hist)
            rows[workers] = rate
            per_epoch = ", ".join(f"{h['tokens_per_s']:,.0f}" for h in hist)
            print(f"{workers:>7} {threads:>9} {rate:>10,.0f} {per_epoch:>28} "
                  f"{statistics.median(h['data_wait_fraction'] for h in hist):>9.1%} "
                  f"{max(h['peak_rss_mb'] for h in hist):>7,.0f} MiB {wall:>7.1f} {os.getloadavg()[0]:>5.1f}",
                  flush=True)
    ray.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["outside", "ray"], choices=["outside", "ray"])
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--preset", default="reference")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per worker and epoch")
    p.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by the workers")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from sane_ray.model import preset
    from sane_ray.train import TrainConfig

    model = preset(args.preset)
    print(f"preset {args.preset}: d_model {model.d_model}, layers {model.n_layers}, heads {model.n_heads}, "
          f"d_z {model.d_z}, window {model.window_size}, d_t {model.d_t}; batch {args.batch_size}/worker; "
          f"tokens = batch * window * 2 views per step; torch {torch.__version__}; "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}")
    torch.set_num_threads(args.cores)
    outside = run_outside(TrainConfig(model=model, batch_size=args.batch_size), args) if "outside" in args.parts else {}
    if "ray" in args.parts:
        rows = run_ray({}, model, args)
        one = rows.get(1)
        if one is not None:
            verdict = "meets" if one >= TARGET_TOKENS_PER_S else "BELOW"
            print(f"\n1 worker: {one:,.0f} tokens/s {verdict} the target of {TARGET_TOKENS_PER_S:,.0f} "
                  f"({one / REFERENCE_TOKENS_PER_S:.2f}x the reference's {REFERENCE_TOKENS_PER_S:,.0f})")
            for key, rate in outside.items():
                if key[0] == "fsdp1":
                    print(f"  vs outside Ray {key[0]} {key[1]}: {one / rate:.0%}")


if __name__ == "__main__":
    main()
