"""Read a canonical tokenized zoo back, checkpoint by checkpoint: tokens, mask, positions, metrics.

The one public way into the shard files of :mod:`sane_ray.data.canonical` (besides the
training stream): nobody decodes the token bytes by hand. Reads one shard (one model)
at a time, so memory does not grow with the zoo.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch

from sane_ray import storage
from sane_ray.data.format import CanonicalZoo, load_manifest
from sane_ray.data.splits import SPLITS
from sane_ray.data.draw import layout_from_json, token_rows
from sane_ray.weights.tokenize import layout_mask, layout_positions
from sane_ray.zoo.spec import METRICS


@dataclass
class CanonicalCheckpoint:
    """One checkpoint as the run trains on it: standardized, aligned tokens (N, d_t), mask (N, d_t), pos (N, 3)."""

    model_id: str
    model_idx: int
    epoch: int
    split: str
    layout_id: str
    tokens: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    metrics: dict[str, float]


def open_canonical(canonical: CanonicalZoo | str, s3: storage.S3Options | None = None) -> CanonicalZoo:
    """A canonical zoo's manifest, from the object or from its URI (``<cache_uri>/<key>``)."""
    if isinstance(canonical, CanonicalZoo):
        return canonical
    found = load_manifest(canonical, s3)
    if found is None:
        raise FileNotFoundError(f"no finished canonical zoo at {canonical} (no readable canonical.json)")
    return found


def iter_checkpoints(
    canonical: CanonicalZoo | str,
    splits: Iterable[str] = SPLITS,
    model_ids: Iterable[str] | None = None,
    s3: storage.S3Options | None = None,
) -> Iterator[CanonicalCheckpoint]:
    """Every checkpoint of the given splits (optionally only ``model_ids``), shard by shard in
    split and model order, epochs in order within a model."""
    zoo = open_canonical(canonical, s3)
    wanted = set(model_ids) if model_ids is not None else None
    token_size = int(zoo.settings["token_size"])
    fs, base = storage.pyarrow_fs(zoo.uri, s3)
    for split in splits:
        for rel in zoo.files.get(split, []):
            mid = posixpath.splitext(posixpath.basename(rel))[0]
            if wanted is not None and mid not in wanted:
                continue
            table = pq.read_table(posixpath.join(base, rel), filesystem=fs)
            flat, offsets, lengths = token_rows(table.column("tokens"), token_size)
            columns = {name: table.column(name).to_pylist() for name in ("model_id", "model_idx", "epoch", "layout_id")}
            metrics = {m: table.column(m).to_pylist() for m in METRICS}
            for r in range(table.num_rows):
                layout = layout_from_json(zoo.groups[columns["layout_id"][r]].layout_json)
                start, n = int(offsets[r]), int(lengths[r])
                yield CanonicalCheckpoint(
                    model_id=columns["model_id"][r], model_idx=int(columns["model_idx"][r]),
                    epoch=int(columns["epoch"][r]), split=split, layout_id=columns["layout_id"][r],
                    tokens=flat[start : start + n].clone(), mask=layout_mask(layout), pos=layout_positions(layout),
                    metrics={m: float(v[r]) for m, v in metrics.items()},
                )
