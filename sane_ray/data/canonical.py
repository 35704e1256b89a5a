"""The canonical tokenized zoo: every checkpoint aligned, standardized and tokenized once.

Built by two streaming passes of Ray Data over the zoo, never holding more than a few
models per worker and small per-model summaries on the driver:

1. *Statistics*: per-layer moments of the training split (per model, merged on the
   driver). Alignment only permutes hidden units, which leaves a layer's moments
   unchanged, so this pass reads the raw checkpoints.
2. *Canonicalization*, in an actor pool: per model, load its checkpoints (bad ones are
   skipped with their reason), align them to the reference of their layout (the
   permutation is found on the model's last usable checkpoint and applied to all), stack,
   tokenize, standardize, and write one Parquet shard ``<split>/<model_id>.parquet``
   with one row per checkpoint.

Models are grouped by token layout (the layout id is a hash of its JSON): models of one
layout share statistics and an alignment reference, and a zoo mixing architectures gets
one group per layout. The cache lives under ``<cache_uri>/<key>/``, where the key hashes
the zoo listing (ids, architectures, checkpoint URIs and digests) and the preprocessing
settings. ``canonical.json`` is written after every shard and ``stats.json``; a
directory without it is an unfinished build and is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from sane_ray import storage
from sane_ray.cluster import remote_args
from sane_ray.data.config import DataConfig
from sane_ray.data.format import (CANONICAL_MANIFEST, CANONICAL_VERSION, SHARD_SCHEMA, STATS, CanonicalZoo,
                                  DataPreparationError, LayoutGroup, arch_kwargs_json, architecture_layout,
                                  model_from_json, model_to_json)
from sane_ray.data.splits import SPLITS, split_models
from sane_ray.weights.align import align_model
from sane_ray.weights.permutation import permutation_spec
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import (
    BnMode,
    tokenize_stack,
)
from sane_ray.zoo.checks import BadCheckpointError
from sane_ray.zoo.reader import load_checkpoint, load_model_checkpoints
from sane_ray.zoo.spec import METRICS, ModelRecord, Skipped, Zoo

log = logging.getLogger(__name__)






# ---------------------------------------------------------------- layout groups






def group_models(
    models: list[ModelRecord], token_size: int, include_bn: BnMode
) -> tuple[dict[str, str], dict[str, LayoutGroup]]:
    """Layout id of every model, and the groups."""
    of_model: dict[str, str] = {}
    groups: dict[str, LayoutGroup] = {}
    for m in models:
        lid, text = architecture_layout(m.architecture, m.arch_kwargs, token_size, include_bn)
        of_model[m.model_id] = lid
        g = groups.get(lid)
        if g is None:
            groups[lid] = LayoutGroup(lid, text, m.architecture, arch_kwargs_json(m), (m.architecture,))
        elif m.architecture not in g.architectures:
            groups[lid] = dataclasses.replace(g, architectures=g.architectures + (m.architecture,))
    return of_model, groups




# ---------------------------------------------------------------- the manifest




def cache_key(zoo: Zoo, cfg: DataConfig) -> str:
    """Content hash of the zoo listing and the preprocessing settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CANONICAL_VERSION, "settings": cfg.canonical_settings()}, sort_keys=True).encode())
    for m in sorted(zoo.models, key=lambda m: m.model_id):
        h.update(f"\n{m.model_id}\t{m.architecture}\t{arch_kwargs_json(m)}".encode())
        for c in m.checkpoints:
            h.update(f"\n\t{c.epoch}\t{c.uri}\t{c.sha256 or ''}".encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------- planning (driver, no weights)


@dataclass
class Plan:
    """Everything decided before heavy work: selected checkpoints, splits, groups."""

    zoo: Zoo
    models: list[ModelRecord]  # selected checkpoints only, sorted by id
    split_of: dict[str, str]
    layout_of: dict[str, str]
    groups: dict[str, LayoutGroup]
    splits: dict[str, list[str]]
    skipped: list[Skipped]


def plan(zoo: Zoo, cfg: DataConfig) -> Plan:
    """Select checkpoints, split by model, group by layout; raise early on unusable settings."""
    skipped = list(zoo.skipped)
    models = []
    for m in sorted(zoo.models, key=lambda m: m.model_id):
        chosen = [c for c in m.checkpoints if cfg.uses_epoch(c.epoch)]
        if chosen:
            models.append(dataclasses.replace(m, checkpoints=chosen))
        else:
            skipped.append(Skipped(m.model_id, f"no checkpoint among the selected epochs (has {m.epochs})"))
    if not models:
        raise DataPreparationError(f"zoo {zoo.uri} has no model with checkpoints at the selected epochs")
    splits = split_models([m.model_id for m in models], cfg.split_fractions, cfg.split_seed,
                          {m.model_id: m.architecture for m in models})
    split_of = {mid: s for s, ids in splits.items() for mid in ids}
    layout_of, groups = group_models(models, cfg.token_size, cfg.include_bn)
    trained = {layout_of[mid] for mid in splits["train"]}
    for lid, g in groups.items():
        if lid not in trained:
            raise DataPreparationError(
                f"architecture {'/'.join(g.architectures)} (layout {lid}) has no model in the training split, "
                "so it has no standardization statistics; add models of it or change split_seed"
            )
    if cfg.reference_model and cfg.reference_model not in splits["train"]:
        where = f"in the {split_of[cfg.reference_model]} split" if cfg.reference_model in split_of else "not in the zoo"
        raise DataPreparationError(f"reference_model {cfg.reference_model!r} must be a training model; it is {where}")
    return Plan(zoo, models, split_of, layout_of, groups, splits, skipped)


def choose_references(p: Plan, cfg: DataConfig, s3: storage.S3Options) -> dict[str, LayoutGroup]:
    """Per layout: the configured reference (for its own layout), else the first training model
    (sorted ids), at its last usable checkpoint. Loads one checkpoint per layout on the driver
    to be sure it is usable."""
    by_id = {m.model_id: m for m in p.models}
    out = {}
    for lid, g in p.groups.items():
        configured = cfg.reference_model and p.layout_of[cfg.reference_model] == lid
        ids = [cfg.reference_model] if configured else p.splits["train"]
        ref = None
        for mid in (i for i in ids if p.layout_of[i] == lid):
            model = by_id[mid]
            for ckpt in reversed(model.checkpoints):
                try:
                    load_checkpoint(model, ckpt, s3=s3, max_abs=cfg.max_abs_weight)
                except BadCheckpointError:
                    continue
                ref = (mid, ckpt.epoch)
                break
            if ref:
                break
        if ref is None:
            raise DataPreparationError(
                f"no usable reference checkpoint for layout {lid} ({'/'.join(g.architectures)}) "
                f"among {'reference_model ' + cfg.reference_model if configured else 'the training models'}"
            )
        out[lid] = dataclasses.replace(g, reference=ref)
    return out


# ---------------------------------------------------------------- workers






def _model_stats(
    batch: dict[str, np.ndarray], include_bn: BnMode, max_abs: float, s3: storage.S3Options
) -> dict[str, np.ndarray]:
    """Stats pass: the per-layer moments of each model's usable checkpoints."""
    out: dict[str, list[str]] = {"model_id": [], "layout_id": [], "stats": []}
    for text in batch["item"]:
        model, extra = model_from_json(text)
        good, _ = load_model_checkpoints(model, s3=s3, max_abs=max_abs)
        stats = StandardizationStats(include_bn)
        for _, sd in good:
            stats.update(sd)
        out["model_id"].append(model.model_id)
        out["layout_id"].append(extra["layout_id"])
        out["stats"].append(stats.to_json())
    return {k: np.array(v, dtype=object) for k, v in out.items()}


@dataclass(frozen=True)
class CanonicalJob:
    """What every canonicalization actor needs (small and picklable)."""

    out_uri: str
    token_size: int
    include_bn: BnMode
    align: bool
    align_max_sweeps: int
    align_seed: int
    max_abs: float
    groups: dict[str, LayoutGroup]
    references: dict[str, str]  # layout id -> reference model JSON (its record, one checkpoint)
    stats: dict[str, dict[str, Any]]  # layout id -> StandardizationStats.to_dict()
    s3: storage.S3Options


class Canonicalizer:
    """Actor: turns one model's checkpoints into one Parquet shard; returns a small summary."""

    def __init__(self, job: CanonicalJob):
        self.job = job
        self.stats = {lid: StandardizationStats.from_dict(d) for lid, d in job.stats.items()}
        self.references: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        for lid, text in job.references.items():
            model, _ = model_from_json(text)
            state = load_checkpoint(model, model.checkpoints[0], s3=job.s3, max_abs=job.max_abs)
            self.references[lid] = (model.model_id, state)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"summary": np.array([json.dumps(self.process(text)) for text in batch["item"]], dtype=object)}

    def process(self, text: str) -> dict[str, Any]:
        job = self.job
        model, extra = model_from_json(text)
        lid, split = extra["layout_id"], extra["split"]
        good, bad = load_model_checkpoints(model, s3=job.s3, max_abs=job.max_abs)
        summary: dict[str, Any] = {
            "model_id": model.model_id, "split": split, "layout_id": lid, "file": None, "rows": 0,
            "skipped": [dataclasses.asdict(s) for s in bad],
        }
        if not good:
            summary["skipped"].append({"path": model.model_id, "reason": "no usable checkpoints"})
            return summary
        states = [sd for _, sd in good]
        ref_id, ref_sd = self.references[lid]
        if job.align and model.model_id != ref_id:
            spec = permutation_spec(model.architecture, **model.arch_kwargs)
            states, _ = align_model(spec, ref_sd, states, job.align_max_sweeps, job.align_seed)
        toks = tokenize_stack(states, job.token_size, job.include_bn)
        tokens = self.stats[lid].apply_tokens(toks.tokens, toks.layout).contiguous().numpy()
        table = pa.table(
            {
                "model_id": [model.model_id] * len(good),
                "model_idx": [extra["model_idx"]] * len(good),
                "epoch": [c.epoch for c, _ in good],
                "layout_id": [lid] * len(good),
                "tokens": [t.tobytes() for t in tokens],
                **{m: [float(c.metrics.get(m, np.nan)) for c, _ in good] for m in METRICS},
            },
            schema=SHARD_SCHEMA,
        )
        rel = f"{split}/{model.model_id}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(storage.join(job.out_uri, rel), buf.getvalue(), job.s3)
        summary.update(file=rel, rows=len(good))
        return summary


# ---------------------------------------------------------------- the two passes


def _items(p: Plan, ids: list[str], model_index: dict[str, int]) -> list[dict[str, str]]:
    by_id = {m.model_id: m for m in p.models}
    return [
        {"item": model_to_json(by_id[i], layout_id=p.layout_of[i], split=p.split_of[i], model_idx=model_index[i])}
        for i in ids
    ]


def compute_stats(
    p: Plan, cfg: DataConfig, s3: storage.S3Options, node_types: bool = False
) -> dict[str, StandardizationStats]:
    """Pass 1: training-split statistics per layout, merged on the driver as results stream in."""
    index = {mid: i for i, mid in enumerate(m.model_id for m in p.models)}
    ds = ray.data.from_items(_items(p, p.splits["train"], index), override_num_blocks=max(1, len(p.splits["train"])))
    ds = ds.map_batches(
        _model_stats, batch_size=1, compute=ray.data.TaskPoolStrategy(size=cfg.num_actors),
        **remote_args("cpu", cfg.actor_cpus, node_types=node_types),
        fn_kwargs={"include_bn": cfg.include_bn, "max_abs": cfg.max_abs_weight, "s3": s3},
    )
    # Per-model moments are a few numbers per layer; merging them in model-id order makes
    # the statistics (and the cache contents) bit-reproducible whatever order tasks finish in.
    parts = sorted((row["model_id"], row["layout_id"], row["stats"]) for row in ds.iter_rows())
    merged: dict[str, StandardizationStats] = {}
    for _, lid, text in parts:
        part = StandardizationStats.from_json(text)
        merged[lid] = merged[lid].merge(part) if lid in merged else part
    empty = [lid for lid in p.groups if lid not in merged or not merged[lid].layers]
    if empty:
        raise DataPreparationError(f"no usable training checkpoint for layout(s) {empty}: cannot compute statistics")
    return merged


def _summaries(
    p: Plan, cfg: DataConfig, job: CanonicalJob, model_index: dict[str, int], node_types: bool
) -> Iterator[dict[str, Any]]:
    ids = [m.model_id for m in p.models]
    ds = ray.data.from_items(_items(p, ids, model_index), override_num_blocks=max(1, len(ids)))
    ds = ds.map_batches(
        Canonicalizer,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
        **remote_args("cpu", cfg.actor_cpus, node_types=node_types),
        fn_constructor_kwargs={"job": job},
    )
    for row in ds.iter_rows():
        yield json.loads(row["summary"])


def build_canonical(
    p: Plan, cfg: DataConfig, out_uri: str, key: str, s3: storage.S3Options, node_types: bool = False
) -> CanonicalZoo:
    """Run both passes and publish the canonical zoo at ``out_uri`` (manifest last).

    ``node_types``: run the passes on CPU-type nodes (:mod:`sane_ray.cluster`)."""
    groups = choose_references(p, cfg, s3)
    stats = compute_stats(p, cfg, s3, node_types)
    by_id = {m.model_id: m for m in p.models}
    refs = {}
    for lid, g in groups.items():
        mid, epoch = g.reference
        model = by_id[mid]
        chosen = [c for c in model.checkpoints if c.epoch == epoch]
        refs[lid] = model_to_json(dataclasses.replace(model, checkpoints=chosen))
    job = CanonicalJob(
        out_uri, cfg.token_size, cfg.include_bn, cfg.align, cfg.align_max_sweeps, cfg.align_seed,
        cfg.max_abs_weight, groups, refs, {lid: s.to_dict() for lid, s in stats.items()}, s3,
    )
    model_index = {mid: i for i, mid in enumerate(sorted(by_id))}
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    members: dict[str, list[str]] = {s: [] for s in SPLITS}
    rows: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    skipped = list(p.skipped)
    for s in _summaries(p, cfg, job, model_index, node_types):
        skipped += [Skipped(**k) for k in s["skipped"]]
        if s["file"]:
            files[s["split"]].append(s["file"])
            members[s["split"]].append(s["model_id"])
            per = rows[s["split"]]
            per[s["layout_id"]] = per.get(s["layout_id"], 0) + s["rows"]
    if not files["train"]:
        raise DataPreparationError(f"no training model of zoo {p.zoo.uri} has a usable checkpoint")
    storage.write_bytes_atomic(
        storage.join(out_uri, STATS), json.dumps({lid: s.to_dict() for lid, s in stats.items()}).encode(), s3
    )
    canonical = CanonicalZoo(
        uri=out_uri, key=key, zoo_uri=p.zoo.uri, settings=cfg.canonical_settings(),
        splits={s: sorted(v) for s, v in members.items()}, files={s: sorted(v) for s, v in files.items()},
        checkpoints=rows, groups=groups, model_index=model_index, skipped=skipped,
        layout_of={mid: p.layout_of[mid] for ids in members.values() for mid in ids},
        digests={mid: by_id[mid].digests() for ids in members.values() for mid in ids},
    )
    storage.write_bytes_atomic(storage.join(out_uri, CANONICAL_MANIFEST), canonical.to_json().encode(), s3)
    return canonical
