"""Distributed SANE pretraining on Ray Train with FSDP2: loop, checkpoints, export.

Public entry points: :func:`run_pretraining`, :func:`train_loop_per_worker`,
:class:`TrainConfig`, :func:`load_sane`, :func:`export_model`. The Ray-dependent ones
are imported lazily, so ``load_sane`` works in an environment that never imports Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from sane_ray.train.config import OptimConfig, TrainConfig
from sane_ray.train.export import export_model, load_sane

_LAZY = {
    "run_pretraining": "sane_ray.train.trainer",
    "steps_per_epoch": "sane_ray.train.trainer",
    "train_loop_per_worker": "sane_ray.train.loop",
}

__all__ = ["OptimConfig", "TrainConfig", "export_model", "load_sane", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
