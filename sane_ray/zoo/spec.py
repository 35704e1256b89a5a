"""The typed description of a model zoo, shared by every reader and writer.

A zoo is a population of models; each model has an architecture (a registry name plus
keyword arguments), training hyperparameters, and checkpoints per epoch (epoch 0 is the
initialization) with metrics. Descriptions are cheap: they hold URIs, never tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Metric names every reader fills (NaN where the source lacks one).
METRICS: tuple[str, ...] = (
    "train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss", "ggap",
)


def with_ggap(metrics: dict[str, float]) -> dict[str, float]:
    """All :data:`METRICS` keys, NaN-filled, with ``ggap = train_acc - test_acc``."""
    out = {k: float(metrics.get(k, math.nan)) for k in METRICS}
    if math.isnan(out["ggap"]):
        out["ggap"] = out["train_acc"] - out["test_acc"]
    return out


@dataclass(frozen=True)
class CheckpointRecord:
    """One stored checkpoint: which model, which epoch, where, and how it scored."""

    model_id: str
    epoch: int
    uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    sha256: str | None = None  # set by the native format; verified on load


@dataclass
class ModelRecord:
    """One trained network and its checkpoints, sorted by epoch."""

    model_id: str
    architecture: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)

    @property
    def epochs(self) -> list[int]:
        return [c.epoch for c in self.checkpoints]

    @property
    def last(self) -> CheckpointRecord:
        return self.checkpoints[-1]

    def digests(self) -> list[str]:
        """The SHA-256 of each checkpoint file the zoo records (the native format does; the public, hf and
        flat layouts do not): what tells two models apart when two zoos reuse one model id."""
        return sorted({c.sha256 for c in self.checkpoints if c.sha256})


@dataclass(frozen=True)
class Skipped:
    """A checkpoint (or model) left out of a zoo, and why."""

    path: str
    reason: str


@dataclass
class Zoo:
    """A zoo's description: ``format`` is its layout, ``"native"``, ``"public"``, ``"hf"`` or ``"flat"`` (``docs/zoos.md``)."""

    uri: str
    format: str
    models: list[ModelRecord]
    skipped: list[Skipped] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_checkpoints(self) -> int:
        return sum(len(m.checkpoints) for m in self.models)

    @property
    def task(self) -> str | None:
        """The task the zoo's models trained on, as its generator recorded it (None: not recorded)."""
        generation = self.metadata.get("generation") or {}
        return generation.get("task") or None

    def model(self, model_id: str) -> ModelRecord:
        for m in self.models:
            if m.model_id == model_id:
                return m
        raise KeyError(f"no model {model_id!r} in zoo {self.uri}")
