"""What a pretraining run is, before it runs: :class:`PretrainConfig`, its named presets and the
checks that need nothing but the config.

The CLI, sweeps and users build and edit these; :mod:`sane_ray.pretrain` runs one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Callable

from sane_ray import storage
from sane_ray.cluster import RunSettings
from sane_ray.data.config import DataConfig
from sane_ray.model.config import MODEL_PRESETS, SaneConfig, preset
from sane_ray.model.layers import check_tables
from sane_ray.train.config import TrainConfig
from sane_ray.train.tracking import TrackingConfig


def default_runs_dir() -> str:
    return os.path.join(storage.cache_dir(), "runs")


def runs_dir(run: RunSettings) -> str:
    """The URI runs go under: ``run.out``, else :func:`default_runs_dir`."""
    return storage.parse_uri(run.out or default_runs_dir()).uri


@dataclass
class PretrainConfig:
    """One pretraining run. ``data.zoo_uri`` empty: the built-in digits zoo."""

    data: DataConfig = field(default_factory=lambda: DataConfig(token_size=64, window_size=16))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(model=_digits_model(), epochs=40))
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _digits_model() -> SaneConfig:
    """A model sized for the built-in digits zoo on a 2-core machine (token size and window from the data)."""
    return _from_data(dataclasses.replace(preset("tiny"), d_model=128, d_z=32, n_heads=4))


def _from_data(model: SaneConfig) -> SaneConfig:
    """``model`` with its copies of the data's facts cleared: the job fills them from ``data``."""
    return dataclasses.replace(model, d_t=0, window_size=0)


# Short flags for the keys people change most (every key also has its --dotted.key flag).
PRETRAIN_ALIASES = {
    "zoo": "data.zoo_uri",
    "out": "run.out",
    "name": "run.name",
    "workers": "run.workers",
    "gpus-per-worker": "run.gpus_per_worker",
    "node-types": "run.node_types",
    "epochs": "train.epochs",
    "batch-size": "train.batch_size",
    "lr": "train.optim.lr",
    "window": "data.window_size",
    "token-size": "data.token_size",
    "tracking": "tracking.backend",
}


def _model_preset_config(name: str) -> PretrainConfig:
    """A run whose model, token size and window follow a named SANE model preset."""
    model = preset(name)
    return PretrainConfig(
        data=DataConfig(token_size=model.d_t, window_size=model.window_size),
        train=TrainConfig(model=_from_data(model)),
    )


def paper_config() -> PretrainConfig:
    """The main job with the reference implementation's objective and optimizer.

    Reconstruction averaged over all entries (padding included) towards the noisy views;
    AdamW with weight decay 3e-9, betas (0.9, 0.999) and no gradient clipping.
    """
    cfg = PretrainConfig()
    model = dataclasses.replace(cfg.train.model, reconstruction_norm="all", reconstruction_target="noisy")
    optim = dataclasses.replace(cfg.train.optim, weight_decay=3e-9, betas=(0.9, 0.999), grad_clip=0.0)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=model, optim=optim))


def digits_wide_config() -> PretrainConfig:
    """The main job with a wider model (d_model 256, d_z 128) for embeddings that probe well.

    On a 200-model digits zoo its mean embedding predicts test accuracy with R^2 0.66 against
    0.51 for the main job's d_z 32 (``bench/bench_probe_ablation.py``, docs/probe.md), at about
    twice the pretraining time, which is why it is not the default of the 10-minute main job.
    """
    cfg = PretrainConfig()
    model = dataclasses.replace(cfg.train.model, d_model=256, d_z=128)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, model=model))


# Named starting points for ``--preset``: each model preset, ``paper`` (the main job's
# model with the reference's objective and optimizer) and ``digits_wide`` (a wider main job).
PRESETS: dict[str, Callable[[], PretrainConfig]] = {
    **{name: functools.partial(_model_preset_config, name) for name in MODEL_PRESETS},
    "paper": paper_config,
    "digits_wide": digits_wide_config,
}


def preset_config(name: str) -> PretrainConfig:
    """The named run preset (:data:`PRESETS`); unknown names list the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown pretraining preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


def check_run_settings(run: RunSettings) -> None:
    if run.workers < 0:
        raise ValueError(f"run.workers must be >= 1, or 0 to size the run to the cluster, got {run.workers}")
    if run.gpus_per_worker < 0 or run.cpus_per_worker < 0:
        raise ValueError("run.gpus_per_worker and run.cpus_per_worker must be >= 0 (cpus_per_worker 0: sized)")


def check_data_facts(cfg: PretrainConfig) -> None:
    """Refuse a model copy of the data's token size or window that disagrees with the data config.

    ``data`` owns both; the model's fields are 0 (filled in from the data) or must agree.
    """
    model, data = cfg.train.model, cfg.data
    for key, have, owner, want in (
        ("d_t", model.d_t, "data.token_size", data.token_size),
        ("window_size", model.window_size, "data.window_size", data.window_size),
    ):
        if have and have != want:
            raise ValueError(
                f"train.model.{key}={have} conflicts with {owner}={want}: the data owns it; set {owner} "
                f"and leave train.model.{key} at 0"
            )


def model_for_data(model: SaneConfig, token_size: int, window_size: int,
                   largest_position: tuple[int, int, int]) -> SaneConfig:
    """The model config with token size and window from the data, its position tables checked.

    ``largest_position`` is the largest ``(n, l, k)`` in the data (the padding position);
    ``model.max_positions`` (table sizes) needs one more row each. Larger tables are headroom; smaller are refused.
    """
    check_tables([m + 1 for m in largest_position], model.max_positions, "train.model.max_positions", "this zoo")
    return dataclasses.replace(model, d_t=token_size, window_size=window_size)
