"""The training stream: canonical shards in, batches of window pairs out (``docs/CONTRACTS.md``).

:class:`WindowStream` turns a split's shard files into one lazy dataset per
``(seed, epoch, rank)``: the files are dealt to the ranks once per run (from the seed),
each epoch reorders a rank's files and groups them into window tasks (``files_per_task``
models each), and every task draws its windows from a generator seeded with the run's
seed, the epoch and the task's files. ``map_batches(read_and_draw)`` reads a task's files
and draws their windows (see :mod:`sane_ray.data.windows` for the order), emitting one
row per window: ``x_i`` (aligned tokens), ``x_j`` (a random function-preserving
permutation of the same model, or ``x_i`` again without permutation augmentation),
``mask``, ``pos``, and the window's source ``model_idx`` and ``epoch``. Nothing draws fresh
entropy: the same seed gives the same batches in the same order (``preserve_order``), an
epoch of a resumed run is the epoch an uninterrupted run would have drawn, and the
validation and test splits ignore the epoch (the same windows every epoch).

Ray Data re-executes a dataset on every pass without telling its tasks which pass it is,
so the epoch enters as data: the train loop builds each epoch's dataset itself
(:meth:`WindowStream.dataset`) rather than re-reading one handed to Ray Train.

Reading inside the window task (instead of ``read_parquet``) keeps raw tokens out of the
object store, and avoids Ray 2.60's Parquet listing, which starts 32 footer-reader actors
on every execution, i.e. on every epoch (about 15 s and 1-2 GB on a 2-core machine).
What a task does with its files is in :mod:`sane_ray.data.draw`.
"""

from __future__ import annotations

import functools
import logging
import posixpath
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data import DataContext

from sane_ray import storage
from sane_ray.cluster import remote_args
from sane_ray.data.config import DataConfig
from sane_ray.data.draw import StreamSpec, layout_from_json, read_and_draw, shard_filesystem
from sane_ray.data.format import CanonicalZoo
from sane_ray.data.splits import SPLITS


def files_per_task(spec: StreamSpec, cfg: DataConfig, checkpoints_per_file: float) -> int:
    """Shard files (models) per window task: ``cfg.models_per_block``, capped so that a block's
    tokens and the windows cut from them (about one sequence per view at the default
    supersampling) stay under ``max_block_bytes``."""
    longest = max(layout_from_json(t).num_tokens for t in spec.layout_jsons)
    per_file = longest * spec.token_size * 4 * 3 * max(checkpoints_per_file, 1.0)
    return max(1, min(cfg.models_per_block, int(cfg.max_block_bytes // per_file)))


def _rng_key(seed: int, *parts: int) -> list[int]:
    """Entropy for numpy's ``SeedSequence`` (non-negative words) from the run's seed and the draw's identity."""
    return [seed % 2**63, *parts]


def task_seed(seed: int, split: str, epoch: int, files: Sequence[str], rank: int = 0) -> int:
    """Generator seed of one window task: the run's seed, the split, the epoch, the task's files and rank."""
    ident = zlib.crc32("\n".join(files).encode())
    return int(np.random.SeedSequence(_rng_key(seed, SPLITS.index(split), epoch, ident, rank)).generate_state(1)[0])


def quiet_data_context(ctx: DataContext, progress_bars: bool = False) -> DataContext:
    """Ray Data's console output in this process: progress bars (one redraw per task and
    operator) and the per-execution banner only when asked for, INFO lines to the log file only."""
    ctx.enable_progress_bars = progress_bars
    ctx.enable_operator_progress_bars = progress_bars
    ctx.print_on_execution_start = progress_bars
    if not progress_bars:  # ray-data.log (the file handler) keeps every record
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
    return ctx


@dataclass(frozen=True)
class WindowStream:
    """One split's windows: a lazy dataset per ``(seed, epoch, rank)``, the same for the same ones.

    Training files are dealt to ranks once per run (an order fixed by the seed), and each
    epoch reorders a rank's files and regroups them into tasks. Validation and test draw
    the same tasks with the same seeds every epoch; with several ranks each rank reads
    every file of the split but draws only every ``world``-th checkpoint (a split may hold
    fewer models than there are ranks). Every rank's dataset is cut to the fewest windows
    any rank holds, so all ranks run the same number of steps.
    """

    uri: str
    split: str
    files: tuple[str, ...]
    spec: StreamSpec
    files_per_task: int
    stream_cpus: float
    windows_per_pass: int
    s3: storage.S3Options | None = None
    progress_bars: bool = False
    node_types: bool = False  # window tasks on CPU-type nodes (sane_ray.cluster)

    @classmethod
    def build(
        cls, canonical: CanonicalZoo, split: str, cfg: DataConfig, spec: StreamSpec,
        s3: storage.S3Options | None = None, node_types: bool = False,
    ) -> WindowStream:
        files = tuple(canonical.files[split])
        per_file = sum(canonical.checkpoints[split].values()) / max(1, len(files))
        return cls(
            uri=canonical.uri, split=split, files=files, spec=spec,
            files_per_task=files_per_task(spec, cfg, per_file), stream_cpus=cfg.stream_cpus,
            windows_per_pass=spec.windows_per_pass(canonical.checkpoints[split]), s3=s3,
            progress_bars=cfg.progress_bars, node_types=node_types,
        )

    @property
    def reshuffles(self) -> bool:
        """Training draws new windows every epoch; validation and test always the same ones."""
        return self.split == "train"

    def rank_files(self, seed: int, rank: int = 0, world: int = 1) -> list[str]:
        """The files rank ``rank`` of ``world`` reads, the same in every epoch."""
        if world == 1 or not self.reshuffles:
            return list(self.files)
        order = np.random.default_rng(_rng_key(seed, SPLITS.index(self.split))).permutation(len(self.files))
        return [self.files[i] for i in order[rank::world]]

    def tasks(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
        """One epoch's window tasks of a rank, in order: ``{"files": [...], "seed": int}`` each."""
        files = self.rank_files(seed, rank, world)
        epoch = epoch if self.reshuffles else 0
        if self.reshuffles:  # a new order, hence new groups of models, every epoch
            order = np.random.default_rng(_rng_key(seed, SPLITS.index(self.split), epoch, rank)).permutation(len(files))
            files = [files[i] for i in order]
        k = self.files_per_task
        groups = [files[i : i + k] for i in range(0, len(files), k)]
        step = 1 if self.reshuffles else world
        tasks, row = [], 0
        for g in groups:
            tasks.append({"files": g, "seed": task_seed(seed, self.split, epoch, g, rank),
                          "keep_from": (rank - row) % step, "keep_every": step})
            row += sum(len(self._file_layouts[f]) for f in g) if step > 1 else 0
        return tasks

    def dataset(self, seed: int, epoch: int, rank: int = 0, world: int = 1) -> ray.data.Dataset:
        """The lazy dataset of one epoch's windows for one rank, in a fixed order."""
        tasks = self.tasks(seed, epoch, rank, world)
        ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
            read_and_draw,
            batch_size=1,
            fn_kwargs={"root": self.uri, "s3": self.s3, "spec": self.spec},
            **remote_args("cpu", self.stream_cpus, node_types=self.node_types),
        )
        if world > 1:
            ds = ds.limit(self.rows_per_rank(seed, world))
        quiet_data_context(ds.context, self.progress_bars)
        ds.context.execution_options.preserve_order = True  # concurrent tasks, output in task order
        return ds

    def rows_per_rank(self, seed: int, world: int = 1) -> int:
        """Windows per pass of every rank: the fewest any rank draws."""
        if world == 1:
            return self.windows_per_pass
        count = dict(zip(self.spec.layout_ids, self.spec.counts))
        if self.reshuffles:
            per_rank = [
                sum(count[lid] for f in self.rank_files(seed, r, world) for lid in self._file_layouts[f])
                for r in range(world)
            ]
        else:  # checkpoint rows dealt round-robin in file order
            rows = [count[lid] for f in self.files for lid in self._file_layouts[f]]
            per_rank = [sum(rows[r::world]) for r in range(world)]
        return min(per_rank)

    @functools.cached_property
    def _file_layouts(self) -> dict[str, list[str]]:
        """Layout id of every checkpoint row of each file (one small column read per file;
        only needed with several ranks)."""
        fs, base = shard_filesystem(self.uri, self.s3)

        def layouts(name: str) -> list[str]:
            return pq.read_table(posixpath.join(base, name), filesystem=fs, columns=["layout_id"]).column(0).to_pylist()

        with ThreadPoolExecutor(max_workers=16) as pool:
            return dict(zip(self.files, pool.map(layouts, self.files)))
