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

View j is gathered straight from the canonical tokens: standardization is a scalar
affine map per layer and commutes with permuting hidden units, so the permuted model's
standardized tokens are a re-indexing of the aligned ones, and only the window's tokens
are gathered (:func:`sane_ray.weights.augment.permute_tokens`). One random permutation is
drawn per checkpoint and pass, shared by that checkpoint's windows in the pass (they
land in different batches).

A block's token column is one contiguous Arrow buffer, viewed without copying as a
(T, d_t) float32 tensor, from which all windows are cut at once.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import DataContext

from sane_ray import storage
from sane_ray.cluster import remote_args
from sane_ray.data.format import CanonicalZoo
from sane_ray.data.config import DataConfig
from sane_ray.data.splits import SPLITS
from sane_ray.data.windows import (
    WindowPlan,
    gather_windows,
    interleave_rows,
    plan_windows,
    window_index,
    windows_per_checkpoint,
)
from sane_ray.weights.augment import permute_tokens
from sane_ray.weights.permutation import permutation_spec, random_permutation
from sane_ray.weights.tokenize import TokenLayout, layout_mask, layout_positions

READ_COLUMNS = ["model_idx", "epoch", "layout_id", "tokens"]


@dataclass(frozen=True)
class StreamSpec:
    """What a window-drawing task needs; hashable, so per-layout tables are cached per worker."""

    window_size: int
    token_size: int
    layout_ids: tuple[str, ...]
    layout_jsons: tuple[str, ...]
    architectures: tuple[tuple[str, str], ...]  # (name, arch kwargs JSON) per layout, for the permutation spec
    counts: tuple[int, ...]  # windows per checkpoint per pass, per layout
    pad_position: tuple[int, int, int]
    permute: bool

    @classmethod
    def build(cls, canonical: CanonicalZoo, cfg: DataConfig) -> StreamSpec:
        lids = tuple(sorted(canonical.groups))
        groups = [canonical.groups[lid] for lid in lids]
        return cls(
            window_size=cfg.window_size,
            token_size=cfg.token_size,
            layout_ids=lids,
            layout_jsons=tuple(g.layout_json for g in groups),
            architectures=tuple((g.architecture, g.arch_kwargs_json) for g in groups),
            counts=tuple(
                windows_per_checkpoint(g.sequence_length, cfg.window_size, cfg.windows_per_model_epoch) for g in groups
            ),
            pad_position=canonical.pad_position(),
            permute=cfg.permutation_augmentation,
        )

    def windows_per_pass(self, rows_per_layout: dict[str, int]) -> int:
        return sum(rows_per_layout.get(lid, 0) * c for lid, c in zip(self.layout_ids, self.counts))


@functools.lru_cache(maxsize=64)
def layout_from_json(text: str) -> TokenLayout:
    """Parsed (and cached) layout: every block refers to one of a handful of layouts."""
    return TokenLayout.from_json(text)


@functools.lru_cache(maxsize=8)
def _layout_tables(spec: StreamSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks and positions of all layouts concatenated, their offsets and lengths."""
    layouts = [layout_from_json(t) for t in spec.layout_jsons]
    lengths = torch.tensor([lay.num_tokens for lay in layouts], dtype=torch.int64)
    offsets = torch.cumsum(lengths, 0) - lengths
    mask = torch.cat([layout_mask(lay) for lay in layouts])
    pos = torch.cat([layout_positions(lay) for lay in layouts])
    return mask, pos, offsets, lengths


def token_rows(
    column: pa.ChunkedArray | pa.Array, token_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-copy view of a binary column of float32 token matrices: flat (T, d_t), row offsets, row lengths."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_large_binary(arr.type):
        arr = arr.cast(pa.large_binary())
    _, off_buf, data_buf = arr.buffers()
    offs = np.frombuffer(off_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    row_bytes = 4 * token_size
    first, last = int(offs[0]), int(offs[-1])
    data = np.frombuffer(data_buf, np.uint8, last - first, first) if last > first else np.empty(0, np.uint8)
    with warnings.catch_warnings():  # read-only Arrow memory: the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(data.view(np.float32).reshape(-1, token_size))
    rel = torch.from_numpy((offs - first) // row_bytes)
    return flat, rel[:-1], rel[1:] - rel[:-1]


def draw_windows(block: pa.Table, spec: StreamSpec, seed: int) -> dict[str, np.ndarray]:
    """One block of checkpoints -> its windows in round-robin order (batch format of the contract).

    Every draw (model order, window starts, permutations) comes from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    flat, offsets, lengths = token_rows(block.column("tokens"), spec.token_size)
    which = {lid: i for i, lid in enumerate(spec.layout_ids)}
    layout_idx = torch.tensor([which[lid] for lid in block.column("layout_id").to_pylist()], dtype=torch.int64)
    model_idx = torch.from_numpy(block.column("model_idx").to_numpy().astype(np.int64))
    epoch = torch.from_numpy(block.column("epoch").to_numpy().astype(np.int64))

    counts = torch.tensor(spec.counts, dtype=torch.int64)[layout_idx]
    plan = plan_windows(lengths, counts, spec.window_size, interleave_rows(model_idx, gen), gen)
    local, valid = window_index(plan, lengths, spec.window_size)
    mask_t, pos_t, lay_off, _ = _layout_tables(spec)
    (x_i,), mask, pos = gather_windows(
        [flat], offsets[plan.rows][:, None] + local, mask_t, pos_t,
        lay_off[layout_idx[plan.rows]][:, None] + local, valid, torch.tensor(spec.pad_position),
    )
    x_j = _permuted_windows(spec, flat, offsets, lengths, layout_idx, plan, gen) if spec.permute else x_i
    return {
        "x_i": x_i.numpy(),
        "x_j": x_j.numpy(),
        "mask": mask.numpy(),
        "pos": pos.numpy(),
        "model_idx": model_idx[plan.rows].numpy(),
        "epoch": epoch[plan.rows].numpy(),
    }


def _permuted_windows(
    spec: StreamSpec, flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
    layout_idx: torch.Tensor, plan: WindowPlan, gen: torch.Generator,
) -> torch.Tensor:
    """View j of every planned window: one random permutation per row, gathered window by window."""
    per_row: dict[int, tuple] = {}
    out = torch.zeros(len(plan.rows), spec.window_size, spec.token_size)
    for w, (r, start) in enumerate(zip(plan.rows.tolist(), plan.starts.tolist())):  # a loop over windows
        if r not in per_row:
            li = int(layout_idx[r])
            pspec = permutation_spec(spec.architectures[li][0], **json.loads(spec.architectures[li][1]))
            tokens = flat[offsets[r] : offsets[r] + lengths[r]]
            per_row[r] = (tokens, layout_from_json(spec.layout_jsons[li]), pspec, random_permutation(pspec, gen))
        tokens, layout, pspec, perms = per_row[r]
        stop = min(start + spec.window_size, len(tokens))
        out[w, : stop - start] = permute_tokens(tokens, layout, pspec, perms, start, stop)
    return out


def files_per_task(spec: StreamSpec, cfg: DataConfig, checkpoints_per_file: float) -> int:
    """Shard files (models) per window task: ``cfg.models_per_block``, capped so that a block's
    tokens and the windows cut from them (about one sequence per view at the default
    supersampling) stay under ``max_block_bytes``."""
    longest = max(layout_from_json(t).num_tokens for t in spec.layout_jsons)
    per_file = longest * spec.token_size * 4 * 3 * max(checkpoints_per_file, 1.0)
    return max(1, min(cfg.models_per_block, int(cfg.max_block_bytes // per_file)))


@functools.lru_cache(maxsize=4)
def _filesystem(root: str, s3: storage.S3Options | None) -> tuple[pafs.FileSystem, str]:
    return storage.pyarrow_fs(root, s3)


def _rng_key(seed: int, *parts: int) -> list[int]:
    """Entropy for numpy's ``SeedSequence`` (non-negative words) from the run's seed and the draw's identity."""
    return [seed % 2**63, *parts]


def task_seed(seed: int, split: str, epoch: int, files: Sequence[str], rank: int = 0) -> int:
    """Generator seed of one window task: the run's seed, the split, the epoch, the task's files and rank."""
    ident = zlib.crc32("\n".join(files).encode())
    return int(np.random.SeedSequence(_rng_key(seed, SPLITS.index(split), epoch, ident, rank)).generate_state(1)[0])


def read_and_draw(
    batch: dict[str, np.ndarray], root: str, s3: storage.S3Options | None, spec: StreamSpec
) -> dict[str, np.ndarray]:
    """Read each task's shard files and draw the windows of every ``keep_every``-th checkpoint
    row from ``keep_from`` on (a task: ``files``, ``seed``, ``keep_from``, ``keep_every``)."""
    fs, base = _filesystem(root, s3)
    parts = []
    for files, seed, start, step in zip(batch["files"], batch["seed"], batch["keep_from"], batch["keep_every"]):
        tables = [pq.read_table(posixpath.join(base, name), filesystem=fs, columns=READ_COLUMNS) for name in files]
        block = pa.concat_tables(tables)
        if step > 1:
            block = block.take(np.arange(int(start), block.num_rows, int(step)))
        parts.append(draw_windows(block, spec, int(seed)))
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


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
        fs, base = _filesystem(self.uri, self.s3)

        def layouts(name: str) -> list[str]:
            return pq.read_table(posixpath.join(base, name), filesystem=fs, columns=["layout_id"]).column(0).to_pylist()

        with ThreadPoolExecutor(max_workers=16) as pool:
            return dict(zip(self.files, pool.map(layouts, self.files)))
