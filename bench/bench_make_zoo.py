"""Time generating a digits zoo end to end (Ray start, training, checkpoint writes, manifest).

Prints wall time, models/s, checkpoint epochs/s, peak RSS (driver and, on Linux, the
largest worker) and min/median/max final test accuracy. Example::

    python bench/bench_make_zoo.py --models 50 --epochs 25 --num-cpus 2
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import tempfile
import time

import pyarrow.parquet as pq
import ray

from sane_ray import storage
from sane_ray.zoo.generate import ZooGenConfig, generate_zoo
from sane_ray.zoo.native import MANIFEST


def _peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, from /proc (Linux only)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@ray.remote(num_cpus=0)
def _worker_pids() -> list[int]:
    """PIDs of this node's Ray worker processes (their peak RSS is read before shutdown)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::"):  # workers retitle themselves ray::<task>
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--arch", default="cnn_digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="zoo URI (default: a temporary directory)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "zoo")
        cfg = ZooGenConfig(out=out, models=args.models, epochs=args.epochs, arch=args.arch,
                           seed=args.seed, overwrite=True)
        t0 = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        t_ray = time.perf_counter() - t0
        uri = generate_zoo(cfg, progress=False)
        wall = time.perf_counter() - t0
        worker_rss = [r for r in map(_peak_rss_mib, ray.get(_worker_pids.remote())) if r is not None]
        ray.shutdown()

        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, MANIFEST))))
        rows = [r for r in table.select(["epoch", "test_acc", "nbytes"]).to_pylist() if r["epoch"] == args.epochs]
        accs = sorted(r["test_acc"] for r in rows)
        total_bytes = sum(table.column("nbytes").to_pylist())

    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"zoo: {args.models} x {args.arch}, {args.epochs} epochs, {args.num_cpus} CPUs, {table.num_rows} checkpoints "
          f"({total_bytes / 2**20:.1f} MiB)")
    print(f"wall time           {wall:8.2f} s  (ray.init {t_ray:.2f} s)")
    print(f"models/s            {args.models / wall:8.2f}")
    print(f"model-epochs/s      {args.models * args.epochs / wall:8.1f}")
    print(f"peak RSS driver     {driver_rss:8.0f} MiB")
    if worker_rss:
        print(f"peak RSS worker     {max(worker_rss):8.0f} MiB (max of {len(worker_rss)} workers)")
    print(f"final test acc      min {accs[0]:.3f}  median {statistics.median(accs):.3f}  max {accs[-1]:.3f}")
    print(f"models at chance    {sum(a < 0.15 for a in accs)} / {len(accs)} (test acc < 0.15)")


if __name__ == "__main__":
    main()
