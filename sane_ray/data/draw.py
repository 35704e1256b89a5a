"""What one window task does: read a block of shard files, cut all its windows, permute view j.

Runs inside Ray Data's ``map_batches`` (:class:`sane_ray.data.stream.WindowStream` plans
the tasks and their seeds); every draw comes from the task's seed.

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
import posixpath
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from sane_ray import storage
from sane_ray.data.config import DataConfig
from sane_ray.data.format import CanonicalZoo, LayoutGroup
from sane_ray.data.windows import (
    WindowPlan,
    balanced_counts,
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
        """Counts from the sequence lengths, balanced across the architectures of a mixed zoo by
        ``cfg.architecture_weights`` (:func:`~sane_ray.data.windows.balanced_counts`; None: not balanced)."""
        lids = tuple(sorted(canonical.groups))
        groups = [canonical.groups[lid] for lid in lids]
        base = [windows_per_checkpoint(g.sequence_length, cfg.window_size, cfg.windows_per_model_epoch) for g in groups]
        rows = [canonical.checkpoints.get("train", {}).get(lid, 0) for lid in lids]
        return cls(
            window_size=cfg.window_size,
            token_size=cfg.token_size,
            layout_ids=lids,
            layout_jsons=tuple(g.layout_json for g in groups),
            architectures=tuple((g.architecture, g.arch_kwargs_json) for g in groups),
            counts=tuple(base if cfg.architecture_weights is None else
                         balanced_counts(base, rows, architecture_weights(groups, cfg.architecture_weights))),
            pad_position=canonical.pad_position(),
            permute=cfg.permutation_augmentation,
        )

    def windows_per_pass(self, rows_per_layout: dict[str, int]) -> int:
        return sum(rows_per_layout.get(lid, 0) * c for lid, c in zip(self.layout_ids, self.counts))


def architecture_weights(groups: list[LayoutGroup], weights: dict[str, float]) -> list[float]:
    """Each layout group's weight: the sum of its architectures' (1 where ``weights`` names none), so
    every architecture counts the same by default, whatever its size or number of models."""
    known = {a for g in groups for a in g.architectures}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"DataConfig.architecture_weights names {', '.join(unknown)}, not in the zoo "
                         f"(it has {', '.join(sorted(known))})")
    return [sum(float(weights.get(a, 1.0)) for a in g.architectures) for g in groups]


def window_shares(spec: StreamSpec, canonical: CanonicalZoo) -> dict[str, float]:
    """Share of a training pass's windows per architecture group (what the log reports)."""
    rows = canonical.checkpoints.get("train", {})
    per = {"/".join(canonical.groups[lid].architectures): rows.get(lid, 0) * c
           for lid, c in zip(spec.layout_ids, spec.counts)}
    total = sum(per.values()) or 1
    return {k: v / total for k, v in per.items()}


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


@functools.lru_cache(maxsize=4)
def shard_filesystem(root: str, s3: storage.S3Options | None) -> tuple[pafs.FileSystem, str]:
    """The canonical zoo's filesystem and base path, opened once per worker process."""
    return storage.pyarrow_fs(root, s3)


def read_and_draw(
    batch: dict[str, np.ndarray], root: str, s3: storage.S3Options | None, spec: StreamSpec
) -> dict[str, np.ndarray]:
    """Read each task's shard files and draw the windows of every ``keep_every``-th checkpoint
    row from ``keep_from`` on (a task: ``files``, ``seed``, ``keep_from``, ``keep_every``)."""
    fs, base = shard_filesystem(root, s3)
    parts = []
    for files, seed, start, step in zip(batch["files"], batch["seed"], batch["keep_from"], batch["keep_every"]):
        tables = [pq.read_table(posixpath.join(base, name), filesystem=fs, columns=READ_COLUMNS) for name in files]
        block = pa.concat_tables(tables)
        if step > 1:
            block = block.take(np.arange(int(start), block.num_rows, int(step)))
        parts.append(draw_windows(block, spec, int(seed)))
    return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
