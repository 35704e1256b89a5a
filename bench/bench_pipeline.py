"""Benchmark the data pipeline: window throughput and peak memory at 1x and 10x zoo size.

Generates two real digits zoos once (``--models`` and ``--factor`` times as many
``cnn_digits`` models, cached under ``$SANE_RAY_CACHE/bench``), then measures each in a
fresh process with its own Ray cluster:

* build: ``prepare_data`` from scratch (stats pass + canonicalization actor pool), wall time;
* stream: ``--passes`` epochs of the training windows through ``streaming_split(2)``
  consumed by two threads with ``iter_torch_batches(batch_size=32)`` (as two Train
  workers would), windows/s per pass; the summary excludes the first pass, which also
  starts the worker processes (reported separately);
* memory: sampled every 0.2 s over the whole process tree (driver, GCS, raylet, every Ray
  worker): peak of the summed PSS (shared object-store pages counted once), peak driver
  RSS and the largest single worker RSS, for the build and the stream separately.

With ``--arch resnet18`` it measures one zoo of CIFAR ResNet-18s instead (``--models``
models x ``--epochs`` + 1 checkpoints: seeded default initializations plus a random walk
of the parameters, ``tests/zoo_builders.py``; alignment and tokenization cost depend on
shapes, not on training), at token size 288 and window 256, and adds windows/s per CPU,
bytes per window, and how many CPUs one GPU needs at the ``resnet`` preset. The GPU's
consumption is a FLOP *estimate* (``gpu_check.flops_per_token`` at ``--gpu-mfu`` of an
H100 SXM's dense bf16 peak) unless ``--gpu-tokens-per-s`` gives a measured figure.

Example::

    python bench/bench_pipeline.py --models 20 --factor 10 --epochs 5 --passes 5
    python bench/bench_pipeline.py --arch resnet18 --models 4 --epochs 2 --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout; Ray workers get it through PYTHONPATH (see _run)

from proctree import kib, tree  # noqa: E402  (bench/ is on the path of a script run from it)

TRAIN_WINDOWS_PER_S = 2 * 80  # two workers of the `reference` preset (~5k tokens/s each, 32-token windows)


# ---------------------------------------------------------------- process-tree memory (Linux /proc)


class MemorySampler:
    """Peaks of summed PSS over the tree, driver RSS and largest other process RSS (MiB)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.peak_pss = self.peak_driver = self.peak_worker = 0.0

    def sample(self) -> float:
        pids = tree(os.getpid())
        pss = sum(kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
        driver = kib(f"/proc/{os.getpid()}/status", "VmRSS:") / 1024
        worker = max((kib(f"/proc/{p}/status", "VmRSS:") for p in pids if p != os.getpid()), default=0) / 1024
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_worker = max(self.peak_worker, worker)
        return pss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def peaks(self) -> dict[str, float]:
        self.sample()
        return {"pss_mib": self.peak_pss, "driver_rss_mib": self.peak_driver, "max_worker_rss_mib": self.peak_worker}


# ---------------------------------------------------------------- one measurement (child process)


def measure(zoo: str, passes: int, num_cpus: int, batch_size: int, token_size: int, window: int) -> dict:
    import ray

    from sane_ray.data import DataConfig, prepare_data

    mem = MemorySampler()
    ray.init(num_cpus=num_cpus, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    time.sleep(2)
    baseline = mem.sample()
    mem.reset()
    with tempfile.TemporaryDirectory() as cache:
        # a handful of ResNets: all of them train (no validation or test split to fill)
        splits = {"split_fractions": (1.0, 0.0, 0.0)} if token_size == 288 else {}
        cfg = DataConfig(zoo_uri=zoo, cache_uri=cache, token_size=token_size, window_size=window, **splits)
        t0 = time.perf_counter()
        data = prepare_data(cfg)
        build_s = time.perf_counter() - t0
        build_mem = mem.peaks()
        mem.reset()

        stream = data.streams["train"]
        per_pass, window_bytes = [], []
        for epoch in range(passes):
            counts = [0, 0]
            shards = [stream.dataset(0, epoch, rank=r, world=2) for r in range(2)]

            def consume(i: int) -> None:
                for b in shards[i].iter_torch_batches(batch_size=batch_size):
                    counts[i] += len(b["x_i"])
                    if not window_bytes:
                        window_bytes.append(sum(v.numel() * v.element_size() for v in b.values()) / len(b["x_i"]))

            t0 = time.perf_counter()
            threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            per_pass.append((sum(counts), time.perf_counter() - t0))
        stream_mem = mem.peaks()
    ray.shutdown()
    steady = per_pass[1:] or per_pass  # the first pass also starts the window tasks' worker processes
    return {
        "zoo": zoo,
        "models": sum(len(v) for v in data.splits.values()),
        "train_windows_per_pass": data.num_windows["train"],
        "skipped": len(data.skipped),
        "build_s": build_s,
        "windows_per_s": sum(n for n, _ in steady) / sum(t for _, t in steady),
        "first_pass_s": per_pass[0][1],
        "bytes_per_window": window_bytes[0],
        "num_cpus": num_cpus,
        "windows_per_s_by_pass": [n / s for n, s in per_pass],
        "baseline_pss_mib": baseline,
        "build": build_mem,
        "stream": stream_mem,
    }


# ---------------------------------------------------------------- driver


def _run(args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def ensure_resnet_zoo(models: int, epochs: int) -> str:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import zoo_builders

    from sane_ray.storage import cache_dir
    from sane_ray.zoo.native import MANIFEST

    out = os.path.join(cache_dir(), "bench", f"resnet18-walk-{models}x{epochs}")
    if not os.path.exists(os.path.join(out, MANIFEST)):  # published last: a half-built zoo is rebuilt
        zoo_builders.build_native_zoo(out, n_models=models, epochs=epochs, archs=("resnet18",))
    return out


def gpu_need(res: dict, args: argparse.Namespace) -> None:
    """CPUs one training GPU needs at the `resnet` preset, from this stream's windows/s per CPU."""
    from gpu_check import flops_per_token, peak_bf16_tflops

    from sane_ray.model import preset

    cfg = preset("resnet")
    if args.gpu_tokens_per_s:
        tokens_per_s, how = args.gpu_tokens_per_s, "measured (--gpu-tokens-per-s)"
    else:
        peak = peak_bf16_tflops("NVIDIA H100 80GB HBM3")
        tokens_per_s = args.gpu_mfu * peak * 1e12 / flops_per_token(cfg, cfg.window_size)
        how = (f"ESTIMATE: {flops_per_token(cfg, cfg.window_size) / 1e9:.2f} GFLOP/token, "
               f"{args.gpu_mfu:.0%} MFU of {peak:g} TFLOP/s (H100 SXM dense bf16)")
    gpu_windows = tokens_per_s / (2 * cfg.window_size)  # both views of a window go through the model
    per_cpu = res["windows_per_s"] / res["num_cpus"]
    print(f"  windows/s per CPU {per_cpu:.1f} (stream {res['windows_per_s']:.1f} windows/s over {res['num_cpus']} CPUs "
          f"of Ray; the machine has {os.cpu_count()} cores, so this is per core-share), "
          f"{res['bytes_per_window'] / 1e6:.2f} MB per window")
    print(f"  one GPU at the resnet preset: {tokens_per_s:,.0f} tokens/s = {gpu_windows:.1f} windows/s [{how}]")
    print(f"  -> CPUs per GPU {gpu_windows / per_cpu:.1f}; "
          f"{gpu_windows * res['bytes_per_window'] / 1e6:.0f} MB/s into the GPU")


def ensure_zoo(models: int, epochs: int, seed: int) -> str:
    import ray

    from sane_ray.storage import cache_dir
    from sane_ray.zoo.generate import ensure_zoo
    from sane_ray.zoo.plan import ZooGenConfig

    out = os.path.join(cache_dir(), "bench", f"cnn_digits-{models}x{epochs}-s{seed}")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        return ensure_zoo(ZooGenConfig(out=out, models=models, epochs=epochs, seed=seed), progress=False)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=20)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--num-cpus", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--arch", default="cnn_digits", choices=["cnn_digits", "resnet18"])
    ap.add_argument("--gpu-mfu", type=float, default=0.4, help="assumed MFU for the GPU estimate")
    ap.add_argument("--gpu-tokens-per-s", type=float, help="a measured GPU figure (bench/gpu_check.py)")
    ap.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.generate:
        print(ensure_zoo(args.generate, args.epochs, args.seed))
        return
    token_size, window = (288, 256) if args.arch == "resnet18" else (289, 32)
    if args.measure:
        print(json.dumps(measure(args.measure, args.passes, args.num_cpus, args.batch_size, token_size, window)))
        return
    if args.arch == "resnet18":
        zoo = ensure_resnet_zoo(args.models, args.epochs)
        print(f"zoo {args.models} ResNet-18s x {args.epochs + 1} checkpoints (random walk): {zoo}; load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        res = json.loads(_run(["--measure", zoo, "--passes", str(args.passes), "--num-cpus", str(args.num_cpus),
                               "--batch-size", str(args.batch_size), "--arch", args.arch]))
        print(f"  models {res['models']}, training windows/pass {res['train_windows_per_pass']}, build "
              f"{res['build_s']:.1f} s, stream {res['windows_per_s']:.1f} windows/s (per pass: "
              + " ".join(f"{w:.1f}" for w in res["windows_per_s_by_pass"]) + ")")
        for name in ("build", "stream"):
            m = res[name]
            print(f"  peak {name:6s}: tree PSS {m['pss_mib']:6.0f} MiB, driver RSS {m['driver_rss_mib']:5.0f} MiB, "
                  f"largest worker RSS {m['max_worker_rss_mib']:5.0f} MiB")
        gpu_need(res, args)
        print(f"1-min load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
        return

    results = []
    for n in (args.models, args.models * args.factor):
        t0 = time.perf_counter()
        zoo = _run(["--generate", str(n), "--epochs", str(args.epochs), "--seed", str(args.seed)])
        took = time.perf_counter() - t0
        print(f"zoo {n} models x {args.epochs} epochs: {zoo} ({took:.0f} s incl. generation if new)", flush=True)
        res = json.loads(_run(["--measure", zoo, "--passes", str(args.passes), "--num-cpus", str(args.num_cpus),
                               "--batch-size", str(args.batch_size)]))
        results.append(res)
        b, s = res["build"], res["stream"]
        print(f"  models {res['models']}, training windows/pass {res['train_windows_per_pass']}, "
              f"skipped {res['skipped']}")
        print(f"  build (stats + canonicalization)  {res['build_s']:7.1f} s")
        print(f"  stream windows/s (2 consumers)    {res['windows_per_s']:7.0f}   (passes 2+; per pass: "
              + " ".join(f"{w:.0f}" for w in res["windows_per_s_by_pass"])
              + f"; first pass {res['first_pass_s']:.1f} s incl. worker start-up)")
        print(f"  Ray baseline PSS after init       {res['baseline_pss_mib']:7.0f} MiB")
        for name, m in (("build", b), ("stream", s)):
            print(f"  peak {name:6s}: tree PSS {m['pss_mib']:6.0f} MiB, driver RSS {m['driver_rss_mib']:5.0f} MiB, "
                  f"largest worker RSS {m['max_worker_rss_mib']:5.0f} MiB", flush=True)
    small, big = results
    print(f"\n{args.factor}x zoo / 1x zoo (target <= 1.3):")
    for name in ("build", "stream"):
        print(f"  {name:6s} peak tree PSS ratio {big[name]['pss_mib'] / small[name]['pss_mib']:.2f}, "
              f"driver RSS ratio {big[name]['driver_rss_mib'] / small[name]['driver_rss_mib']:.2f}")
    slowest = min(r["windows_per_s"] for r in results)
    print(f"windows/s {slowest:.0f} vs two training workers' consumption ~{TRAIN_WINDOWS_PER_S}: "
          f"{slowest / TRAIN_WINDOWS_PER_S:.1f}x")
    print(f"1-min load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
