"""The main job: zoo -> canonical tokens (Ray Data) -> SANE pretraining (Ray Train + FSDP2).

:class:`PretrainConfig` is the whole run as one typed tree (``data``, ``train`` with its
``model``, ``run``); :func:`run_pretrain` checks it against the zoo and the cluster before
any worker starts, prepares the data, trains, and exports. Every mistake a user can make
in the config is reported here, in one line, rather than from inside a worker.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import ray

from sane_ray import storage
from sane_ray.config import dump_config
from sane_ray.data.config import DataConfig
from sane_ray.model.config import PRESETS as MODEL_PRESETS
from sane_ray.model.config import SaneConfig, preset
from sane_ray.train.config import TrainConfig

log = logging.getLogger("sane_ray.pretrain")


def default_runs_dir() -> str:
    return os.path.join(os.environ.get("SANE_RAY_CACHE", os.path.expanduser("~/.cache/sane-ray")), "runs")


@dataclass
class RunSettings:
    """Where the run lives and what it runs on."""

    name: str = "sane-digits"
    out: str = ""  # storage for checkpoints and results; "": ~/.cache/sane-ray/runs
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    # The cluster may grow (autoscaler): skip the check that it can hold every worker now.
    autoscaling: bool = False
    # Logical CPUs for a local cluster started by this job (0: enough for workers + data actors).
    local_cpus: int = 0


@dataclass
class PretrainConfig:
    """One pretraining run. ``data.zoo_uri`` empty: the built-in digits zoo."""

    data: DataConfig = field(default_factory=lambda: DataConfig(token_size=64, window_size=16))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(model=_digits_model(), epochs=40))
    run: RunSettings = field(default_factory=RunSettings)


def _digits_model() -> SaneConfig:
    """A model sized for the built-in digits zoo on a 2-core machine."""
    return dataclasses.replace(preset("tiny"), d_t=64, window_size=16, d_model=128, d_z=32, n_heads=4)


PRESETS = sorted(MODEL_PRESETS)

# Short flags for the keys people change most (every key also has its --dotted.key flag).
PRETRAIN_ALIASES = {
    "zoo": "data.zoo_uri",
    "out": "run.out",
    "name": "run.name",
    "workers": "run.workers",
    "gpus-per-worker": "run.gpus_per_worker",
    "epochs": "train.epochs",
    "batch-size": "train.batch_size",
    "lr": "train.optim.lr",
    "window": "data.window_size",
    "token-size": "data.token_size",
}


def preset_config(name: str) -> PretrainConfig:
    """A run whose model, token size and window follow a named SANE preset."""
    model = preset(name)
    return PretrainConfig(
        data=DataConfig(token_size=model.d_t, window_size=model.window_size),
        train=TrainConfig(model=model),
    )


def check_run_settings(run: RunSettings) -> None:
    if run.workers < 1:
        raise ValueError(f"run.workers must be >= 1, got {run.workers}")
    if run.gpus_per_worker < 0 or run.cpus_per_worker <= 0:
        raise ValueError("run.gpus_per_worker must be >= 0 and run.cpus_per_worker > 0")


def ensure_ray(cfg: PretrainConfig) -> None:
    """Connect to the cluster (``RAY_ADDRESS`` / a job's cluster) or start a local one.

    A local cluster gets more logical CPUs than cores: Train workers and Data actors must
    all be placeable at once, or Ray Data waits forever for an actor slot.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    run, data = cfg.run, cfg.data
    need = run.workers * run.cpus_per_worker + data.num_actors * data.actor_cpus + data.stream_cpus + 1
    ray.init(num_cpus=run.local_cpus or max(4, math.ceil(need)), object_store_memory=512 * 1024**2)


def check_capacity(run: RunSettings, data: DataConfig) -> None:
    """Refuse work the cluster can never schedule (unless it autoscales).

    The data stream's tasks run next to the Train workers: with every CPU held by a
    worker, no window is ever drawn and training waits forever instead of failing.
    """
    if run.autoscaling:
        return
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    hint = "or set run.autoscaling=true on an autoscaling cluster"
    if run.workers * run.gpus_per_worker > gpus + 1e-9:
        raise ValueError(
            f"{run.workers} workers x {run.gpus_per_worker:g} GPU need {run.workers * run.gpus_per_worker:g} GPU, "
            f"but the cluster has {gpus:g}; lower run.workers or run.gpus_per_worker, {hint}"
        )
    need = run.workers * run.cpus_per_worker + data.stream_cpus
    if need > cpus + 1e-9:
        raise ValueError(
            f"{run.workers} workers x {run.cpus_per_worker:g} CPU plus {data.stream_cpus:g} CPU for the data stream "
            f"need {need:g} CPU, but the cluster has {cpus:g}; lower run.workers, run.cpus_per_worker or "
            f"data.stream_cpus, {hint}"
        )
    if data.actor_cpus > cpus + 1e-9:
        raise ValueError(f"data.actor_cpus={data.actor_cpus:g} exceeds the cluster's {cpus:g} CPU; lower it, {hint}")


def model_for_data(model: SaneConfig, token_size: int, window_size: int, max_positions: tuple[int, int, int]) -> SaneConfig:
    """The model config with token size, window and position tables taken from the data."""
    tables = tuple(max(have, need + 1) for have, need in zip(model.max_positions, max_positions))
    return dataclasses.replace(model, d_t=token_size, window_size=window_size, max_positions=tables)


def run_pretrain(cfg: PretrainConfig) -> Any:
    """Run the whole job; returns Ray Train's ``Result`` (``result.return_value``: history)."""
    from sane_ray.data.pipeline import prepare_data
    from sane_ray.embed.preprocess import run_export_files
    from sane_ray.train.trainer import run_pretraining, steps_per_epoch

    check_run_settings(cfg.run)
    ensure_ray(cfg)
    check_capacity(cfg.run, cfg.data)
    data_cfg = cfg.data
    if not data_cfg.zoo_uri:
        from sane_ray.zoo.generate import ensure_default_zoo

        log.info("no zoo given: using the built-in digits zoo (generated on first use)")
        data_cfg = dataclasses.replace(data_cfg, zoo_uri=ensure_default_zoo(progress=True))

    prepared = prepare_data(data_cfg)
    model = model_for_data(cfg.train.model, prepared.token_size, prepared.window_size, prepared.max_positions)
    # Steps from the known window count: counting the dataset would run a whole pass.
    steps = cfg.train.steps_per_epoch or steps_per_epoch(
        prepared.num_windows["train"], cfg.run.workers, cfg.train.batch_size)
    train_cfg = dataclasses.replace(cfg.train, model=model, steps_per_epoch=steps, probe_data=prepared.cache_uri)
    resolved = dataclasses.replace(cfg, data=data_cfg, train=train_cfg)

    out = storage.parse_uri(cfg.run.out or default_runs_dir()).uri
    run_uri = storage.join(out, cfg.run.name)
    log.info("pretraining %s: %d workers, windows per pass %s, run dir %s",
             data_cfg.zoo_uri, cfg.run.workers, prepared.num_windows, run_uri)
    export_files = {"pretrain_config.yaml": dump_config(resolved).encode(), **run_export_files(prepared)}
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.gpus_per_worker:
        resources["GPU"] = cfg.run.gpus_per_worker
    result = run_pretraining(
        train_cfg,
        {k: v for k, v in prepared.datasets.items() if k in ("train", "val")},
        storage_path=out,
        name=cfg.run.name,
        num_workers=cfg.run.workers,
        use_gpu=cfg.run.gpus_per_worker > 0,
        resources_per_worker=resources,
        export_files=export_files,
    )
    log.info("done: model, loss curve and summary in %s", run_uri)
    print(f"\nSANE pretraining finished. Results: {run_uri}/summary.md, {run_uri}/loss_curve.png")
    return result
