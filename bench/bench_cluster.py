"""Per-unit costs behind docs/cluster.md's sizing: one CPU, no Ray, so the figures scale by core.

For each architecture (``cnn_digits``, ``resnet18``) it builds a small native zoo on local
disk (random-walk weights from tests/zoo_builders: alignment and tokenization cost depends
on shapes, not on training) and times, in this process:

* stats: the statistics pass of one model (load its checkpoints, per-layer moments);
* canonical: one preprocessing actor call per model (load, align to the reference,
  tokenize, standardize, write its Parquet shard), i.e. ``Canonicalizer.process``;
* windows: one training epoch's window tasks as the job forms them (``WindowStream.tasks``:
  read the shards, draw every checkpoint's windows, permute view j), as windows and
  tokens per CPU-second.

Run with one thread, as a 1-CPU Ray task would: ``OMP_NUM_THREADS=1 python bench/bench_cluster.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import zoo_builders as zb  # noqa: E402
from sane_ray import storage  # noqa: E402
from sane_ray.data.canonical import CanonicalJob, Canonicalizer, _items, _model_stats, choose_references, plan
from sane_ray.data.format import CanonicalZoo, model_to_json
from sane_ray.data.config import DataConfig  # noqa: E402
from sane_ray.data.draw import StreamSpec, read_and_draw  # noqa: E402
from sane_ray.data.stream import WindowStream  # noqa: E402
from sane_ray.weights.standardize import StandardizationStats  # noqa: E402
from sane_ray.zoo.reader import open_zoo  # noqa: E402


class Timer:
    """Wall and CPU seconds of a block: on a loaded machine CPU time is the cost a free core would see."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _cell(value) -> np.ndarray:
    """A one-row batch column holding ``value`` (a list stays one cell)."""
    out = np.empty(1, dtype=object)
    out[0] = value
    return out


def measure(arch: str, models: int, checkpoints: int, token_size: int, window: int, root: str) -> dict:
    zoo_uri = os.path.join(root, f"zoo-{arch}")
    zb.build_native_zoo(zoo_uri, n_models=models, epochs=checkpoints - 1, archs=(arch,))
    cfg = DataConfig(zoo_uri=zoo_uri, token_size=token_size, window_size=window, split_fractions=(1.0, 0.0, 0.0))
    s3 = storage.S3Options().resolved()
    p = plan(open_zoo(zoo_uri), cfg)
    index = {m.model_id: i for i, m in enumerate(p.models)}
    items = [row["item"] for row in _items(p, [m.model_id for m in p.models], index)]

    stats_s, merged = [], {}
    for text in items:
        with Timer() as t:
            out = _model_stats({"item": np.array([text], dtype=object)}, cfg.include_bn, cfg.max_abs_weight, s3)
        stats_s.append(t)
        lid, part = out["layout_id"][0], StandardizationStats.from_json(out["stats"][0])
        merged[lid] = merged[lid].merge(part) if lid in merged else part

    groups = choose_references(p, cfg, s3)
    refs = {}
    by_id = {m.model_id: m for m in p.models}
    for lid, g in groups.items():
        mid, epoch = g.reference
        m = by_id[mid]
        refs[lid] = model_to_json(dataclasses.replace(m, checkpoints=[c for c in m.checkpoints if c.epoch == epoch]))
    out_uri = os.path.join(root, f"canonical-{arch}")
    job = CanonicalJob(out_uri, token_size, cfg.include_bn, True, cfg.align_max_sweeps, cfg.align_seed,
                       cfg.max_abs_weight, groups, refs, {lid: s.to_dict() for lid, s in merged.items()}, s3)
    actor = Canonicalizer(job)
    canon_s, files = [], []
    for text in items:
        with Timer() as t:
            summary = actor.process(text)
        canon_s.append(t)
        files.append(summary["file"])
    aligned = canon_s[1:] or canon_s  # the reference model itself is not aligned

    lid = next(iter(groups))
    canonical = CanonicalZoo(uri=out_uri, key="bench", zoo_uri=zoo_uri, settings={}, splits={},
                             files={"train": files}, checkpoints={"train": {lid: models * checkpoints}}, groups=groups)
    spec = StreamSpec.build(canonical, cfg)
    # The job's own window tasks for one epoch, each run as its one-row batch.
    tasks = [{k: _cell(v) for k, v in t.items()} for t in WindowStream.build(canonical, "train", cfg, spec).tasks(0, 0)]
    passes = []
    for _ in range(3):
        with Timer() as t:
            n_windows = sum(len(read_and_draw(task, out_uri, None, spec)["x_i"]) for task in tasks)
        passes.append(t)
    cpu = min(t.cpu for t in passes[1:])
    wall = min(t.wall for t in passes[1:])
    seq = groups[next(iter(groups))].sequence_length
    return {
        "arch": arch, "models": models, "checkpoints_per_model": checkpoints, "tokens_per_checkpoint": seq,
        "token_size": token_size, "window": window,
        "stats_cpu_s_per_model": statistics.median(t.cpu for t in stats_s),
        "stats_wall_s_per_model": statistics.median(t.wall for t in stats_s),
        "canonical_cpu_s_per_model": statistics.median(t.cpu for t in aligned),
        "canonical_wall_s_per_model": statistics.median(t.wall for t in aligned),
        "windows_per_pass": n_windows,
        "windows_per_cpu_s": n_windows / cpu,
        "windows_per_wall_s": n_windows / wall,
        "window_tokens_per_cpu_s": n_windows * window / cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--digits-models", type=int, default=8)
    ap.add_argument("--resnet-models", type=int, default=3)
    ap.add_argument("--checkpoints", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        rows = [
            measure("cnn_digits", args.digits_models, args.checkpoints, 64, 16, root),
            measure("resnet18", args.resnet_models, args.checkpoints, 288, 256, root),
        ]
    print(json.dumps({"loadavg": open("/proc/loadavg").read().split()[:3], "results": rows}, indent=1))


if __name__ == "__main__":
    main()
