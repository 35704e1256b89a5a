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
from sane_ray.zoo.generate import generate_zoo
from sane_ray.zoo.plan import ZooGenConfig
from sane_ray.zoo.native import MANIFEST


def _proc_table() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, cmdline) for every process we can see (Linux /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                table[int(entry)] = (ppid, f.read())
        except OSError:
            continue
    return table


def _our_workers() -> list[int]:
    """Ray workers of the cluster this driver started (its descendants; workers retitle themselves ray::...)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack, found = [os.getpid()], []
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            if table[child][1].startswith(b"ray::"):
                found.append(child)
    return found


def _worker_usage(pid: int) -> tuple[float, float] | None:
    """(peak RSS MiB, CPU seconds) of a live process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, StopIteration):
        return None
    return hwm, cpu


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
        usage = [u for u in map(_worker_usage, _our_workers()) if u is not None]
        ray.shutdown()

        table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, MANIFEST))))
        rows = [r for r in table.select(["epoch", "test_acc", "nbytes"]).to_pylist() if r["epoch"] == args.epochs]
        accs = sorted(r["test_acc"] for r in rows)
        total_bytes = sum(table.column("nbytes").to_pylist())

    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()[0]
    print(f"zoo: {args.models} x {args.arch}, {args.epochs} epochs, {args.num_cpus} CPUs, {table.num_rows} checkpoints "
          f"({total_bytes / 2**20:.1f} MiB)")
    print(f"wall time           {wall:8.2f} s  (ray.init {t_ray:.2f} s; 1-min load average at the end {load:.1f})")
    print(f"models/s            {args.models / wall:8.2f}")
    print(f"model-epochs/s      {args.models * args.epochs / wall:8.1f}")
    print(f"peak RSS driver     {driver_rss:8.0f} MiB")
    if usage:
        cpu = sum(u[1] for u in usage)
        print(f"peak RSS worker     {max(u[0] for u in usage):8.0f} MiB (max of {len(usage)} workers)")
        print(f"worker CPU time     {cpu:8.1f} s  ({cpu / (args.models * args.epochs) * 1e3:.0f} ms per model-epoch, "
              f"incl. worker start-up; wall on {args.num_cpus} idle cores >= {cpu / args.num_cpus:.1f} s)")
    print(f"final test acc      min {accs[0]:.3f}  median {statistics.median(accs):.3f}  max {accs[-1]:.3f}")
    print(f"models at chance    {sum(a < 0.15 for a in accs)} / {len(accs)} (test acc < 0.15)")


if __name__ == "__main__":
    main()
