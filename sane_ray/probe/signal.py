"""A representation-quality signal during pretraining: the validation R^2 of a test-accuracy probe.

Reconstruction loss alone does not say whether the embeddings are useful. The pretraining
job installs :func:`probe_signal` as the train loop's epoch signal, which the loop calls every
``TrainConfig.probe_every`` epochs (``train/`` does not import the probe): the current
encoder embeds every checkpoint of the training and validation models of the run's
canonical zoo (haloed, mean over tokens), a ridge probe is fitted on the training
models (alpha picked on a fifth of them, held out by model) and scored on the
validation models. The test split stays untouched for the probe job.

Under FSDP every forward is a collective, so every rank embeds the same checkpoints in
the same batches; the result is identical on all ranks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from sane_ray.data.format import CanonicalZoo
from sane_ray.data.shards import iter_checkpoints, open_canonical
from sane_ray.embed.encode import encode_haloed, halo_plan, summarize
from sane_ray.probe.linear import ridge_probe
from sane_ray.weights.tokenize import layout_positions

_cache: dict[str, dict[str, Any]] = {}  # canonical URI -> its train/val tokens, loaded once per worker


def _load(uri: str) -> dict[str, Any]:
    """Tokens (stacked per layout) of the training and validation checkpoints, with model, split and test accuracy."""
    if uri not in _cache:
        zoo: CanonicalZoo = open_canonical(uri)
        rows: dict[str, dict[str, list]] = {}
        for c in iter_checkpoints(zoo, splits=("train", "val")):
            r = rows.setdefault(c.layout_id, {"tokens": [], "model": [], "split": [], "acc": []})
            r["tokens"].append(c.tokens)
            r["model"].append(c.model_id)
            r["split"].append(c.split)
            r["acc"].append(c.metrics["test_acc"])
        _cache[uri] = {
            "pad": zoo.pad_position(),
            "layouts": {lid: (zoo.groups[lid].layout, torch.stack(r.pop("tokens")), r) for lid, r in rows.items()},
        }
    return _cache[uri]


@torch.no_grad()
def embed_canonical(model: torch.nn.Module, uri: str, batch_windows: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Mean embeddings (rows, d_z) of the canonical zoo's train and val checkpoints, and per-row model/split/acc."""
    data = _load(uri)
    param = next(model.parameters())
    window = model.cfg.window_size
    feats, meta = [], {"model": [], "split": [], "acc": []}
    for layout, tokens, r in data["layouts"].values():
        pos = layout_positions(layout)
        plan = halo_plan(layout.num_tokens, window)
        # Called outside forward(), FSDP's mixed precision does not cast the inputs: match the weights.
        z = encode_haloed(model, tokens.to(param.dtype), pos, plan, data["pad"], batch_windows)
        feats.append(summarize(z, pos[:, 1].to(z.device)).mean.cpu().numpy())
        for k in meta:
            meta[k] += r[k]
    return np.concatenate(feats), {k: np.asarray(v) for k, v in meta.items()}


def probe_signal(model: torch.nn.Module, uri: str, seed: int = 0) -> dict[str, float]:
    """``{"val_probe_r2": R^2}`` of a test-accuracy ridge probe on the current embeddings (NaN if unfit)."""
    was_training = model.training
    model.eval()
    # encode() bypasses the root's forward hook, so the root's own (sharded) weights are
    # gathered here; the blocks gather theirs in their forward as usual.
    sharded = isinstance(model, FSDPModule)
    if sharded:
        model.unshard()
    try:
        x, meta = embed_canonical(model, uri)
    finally:
        if sharded:
            model.reshard()
        model.train(was_training)
    train_ids = np.unique(meta["model"][meta["split"] == "train"])
    held = set(np.random.default_rng(seed).permutation(train_ids)[: max(1, len(train_ids) // 5)])
    split = np.where(meta["split"] == "val", "test", np.where([m in held for m in meta["model"]], "val", "train"))
    try:
        return {"val_probe_r2": ridge_probe(x, meta["acc"], split, name="val_probe_r2").score}
    except ValueError:  # too few models for the splits (tiny test zoos)
        return {"val_probe_r2": math.nan}
