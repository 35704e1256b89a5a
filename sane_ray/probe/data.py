"""What the probe job collects and computes, as data: one row per checkpoint (:class:`ProbeData`),
the fitted tables (:class:`ProbeResults`), and the names of the feature columns.

Its own module so that the single-architecture job (:mod:`sane_ray.probe.job`) and the
mixed-zoo report (:mod:`sane_ray.probe.mixed`) share them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sane_ray.weights.standardize import StandardizationStats

TARGETS = {"Acc": "test_acc", "Epoch": "epoch", "Ggap": "ggap"}  # the paper's rows -> checkpoint values
SANE, CONTROL, FULL = "SANE", "SANE (untrained)", "SANE (full sequence)"
MEAN_STD = "SANE (mean, std)"  # the paper's mean token latent with the tokens' std beside it
LAYER_MEAN = "SANE (per-layer mean)"  # the mean token latent of each layer, concatenated (like s(W)'s blocks)
LAYER_MEAN_STD = "SANE (per-layer mean, std)"  # ... with each layer's std of token latents beside its mean
CONTROL_LAYER = "SANE (untrained, per-layer mean)"  # the control for LAYER_MEAN
CHANCE, TEST_MAJORITY = "chance (train majority)", "test majority"  # hyperparameter table, see ProbeScore
SELECTED = "SANE (selected on val)"  # per target, the variant of VARIANTS with the best validation score
VARIANTS = (SANE, MEAN_STD, LAYER_MEAN, LAYER_MEAN_STD, FULL)  # what the trained encoder's embedding is
# Hyperparameter keys that identify a model or its run rather than describe its training.
IDENTIFIERS = {"seed", "index", "split_seed", "epochs", "epochs_train", "task", "model_id"}
MAX_CLASSES = 20  # a "category" with more distinct values is an identifier, not a hyperparameter


@dataclass
class ProbeData:
    """One row per checkpoint: its model, epoch, split, targets, features per method, layer spread."""

    model_id: list[str] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("test_acc", "ggap")})
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)
    spread: list[np.ndarray] = field(default_factory=list)
    hparams: list[dict[str, Any]] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Layout id -> statistics pooled over the probed models for layers the run's do not cover.
    fallback: dict[str, StandardizationStats] = field(default_factory=dict)
    pretrained: list[bool] = field(default_factory=list)  # per row: the run trained on this model
    arch: list[str] = field(default_factory=list)  # per row: its architecture (architecture_labels)
    flat_ok: bool = True  # W fits under max_flat_features
    full_ok: bool = True  # the full token sequence does
    weights_per_model: int = 0

    def assign_splits(self, split_of: dict[str, str], trained: set[str]) -> None:
        self.split = [split_of[m] for m in self.model_id]
        self.pretrained = [m in trained for m in self.model_id]

    def test_models_pretrained(self) -> int:
        return len({m for m, s, p in zip(self.model_id, self.split, self.pretrained) if s == "test" and p})

    def target(self, key: str) -> np.ndarray:
        return np.asarray(self.epoch if key == "epoch" else self.metrics[key], dtype=np.float64)

    def matrix(self, method: str) -> np.ndarray:
        return np.concatenate(self.features[method], axis=0)



@dataclass
class ProbeResults:
    """Everything the job writes, as data."""

    test: dict[str, dict[str, float]]
    kfold: dict[str, dict[str, tuple[float, float]]]
    hparams: dict[str, dict[str, float]]
    alphas: dict[str, dict[str, float]]
    points: dict[str, tuple[np.ndarray, np.ndarray, float]]
    val: dict[str, dict[str, float]] = field(default_factory=dict)  # validation score of the chosen alpha
    selected: dict[str, str] = field(default_factory=dict)  # target -> the SANE variant validation picked
    kfold_selected: dict[str, list[str]] = field(default_factory=dict)  # target -> each fold's pick
