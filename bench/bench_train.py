"""Pretraining throughput through Ray Train + FSDP2 on CPU workers.

Runs ``run_pretraining`` at a preset (default ``reference``: d_model 256, 4+4 layers,
4 heads, d_z 64, window 32, d_t 289) with batch 32 per worker on synthetic windows, fp32,
for 1 and 2 workers sharing the machine's cores. Tokens are counted as
``batch * window * 2 views`` per worker and step (both views go through the model);
the figures are from the fastest epoch after the first (which includes start-up and
warm-up), so a busy neighbour on a shared machine distorts them less.

Target: one FSDP2 worker in Ray Train >= 5,185 tokens/s (the SANE reference's
single-process figure on a 2-core machine).

    python bench/bench_train.py [--workers 1 2] [--steps 20] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_TOKENS_PER_S = 5185.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--preset", default="reference")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per worker and epoch")
    p.add_argument("--epochs", type=int, default=4, help="the first one is warm-up")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by the workers")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is warm-up")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sane_ray.model import preset
    from sane_ray.train import TrainConfig, run_pretraining
    from sane_ray.train.synthetic import synthetic_dataset

    model = preset(args.preset)
    ray.init(num_cpus=max(4, 2 * args.cores), object_store_memory=600 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    num_windows = args.steps * args.batch_size * max(args.workers)
    t0 = time.perf_counter()
    train = synthetic_dataset(num_windows, model, num_blocks=8).materialize()
    print(f"synthetic data: {num_windows} windows in {time.perf_counter() - t0:.1f}s")
    print(f"preset {args.preset}: d_model {model.d_model}, layers {model.n_layers}, heads {model.n_heads}, "
          f"d_z {model.d_z}, window {model.window_size}, d_t {model.d_t}; batch {args.batch_size}/worker, fp32")
    print("tokens = batch * window * 2 views per worker and step; fastest epoch after the first\n")
    print(f"{'workers':>7} {'threads/w':>9} {'tokens/s':>10} {'windows/s':>10} {'data wait':>9} "
          f"{'step ms':>8} {'peak RSS/w':>11} {'wall s':>7}")
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for workers in args.workers:
            threads = max(1, args.cores // workers)
            cfg = TrainConfig(model=model, epochs=args.epochs, batch_size=args.batch_size,
                              steps_per_epoch=args.steps, num_threads=threads)
            # Only `steps` batches per worker: the shared dataset is sized for the largest run.
            ds = train.limit(args.steps * args.batch_size * workers)
            start = time.perf_counter()
            result = run_pretraining(
                cfg, {"train": ds}, storage, f"bench-{workers}w", num_workers=workers,
                resources_per_worker={"CPU": threads}, controller_failure_limit=0,
            )
            wall = time.perf_counter() - start
            best = max(result.return_value[1:], key=lambda h: h["tokens_per_s"])
            step_ms = 1000 * best["epoch_time_s"] / best["steps"]
            rows.append((workers, best["tokens_per_s"]))
            print(f"{workers:>7} {threads:>9} {best['tokens_per_s']:>10,.0f} {best['windows_per_s']:>10,.1f} "
                  f"{best['data_wait_fraction']:>9.1%} {step_ms:>8.0f} {best['peak_rss_mb']:>8,.0f} MiB {wall:>7.1f}")
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ndriver peak RSS: {driver_rss:,.0f} MiB")
    one = dict(rows).get(1)
    if one is not None:
        verdict = "meets" if one >= TARGET_TOKENS_PER_S else "BELOW"
        print(f"1 worker: {one:,.0f} tokens/s {verdict} the target of {TARGET_TOKENS_PER_S:,.0f} tokens/s")
    ray.shutdown()


if __name__ == "__main__":
    main()
