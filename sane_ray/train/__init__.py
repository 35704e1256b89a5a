"""Distributed SANE pretraining on Ray Train with FSDP2: loop, checkpoints, TorchTrainer wiring.

Public entry points: :func:`train_sane`, :func:`train_loop_per_worker`,
:class:`TrainConfig`. The Ray-dependent ones are imported lazily. The exported model's
writer and reader (``export_model``, ``load_sane``) live in :mod:`sane_ray.model.export`.
"""

from __future__ import annotations

import importlib
from typing import Any

from sane_ray.train.config import OptimConfig, TrainConfig

_LAZY = {
    "train_sane": "sane_ray.train.trainer",
    "steps_per_epoch": "sane_ray.train.trainer",
    "train_loop_per_worker": "sane_ray.train.loop",
}

__all__ = ["OptimConfig", "TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
