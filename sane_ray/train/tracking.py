"""Experiment tracking: a run's config and per-epoch metrics to MLflow or Weights & Biases.

Off by default and installed as an extra (``pip install 'sane-ray[tracking]'`` for MLflow;
``pip install wandb`` for W&B). Only rank 0 logs. The driver checks the backend imports
(:func:`check_tracking`) before any worker starts; the train loop opens the tracker
(:func:`open_tracker`), logs every epoch's metrics with the epoch as the step, and closes
it at the end. A resumed run continues the same MLflow run (found by its run directory),
so its history stays in one place.

Defaults work offline: MLflow writes a local file store (``<cache>/mlruns``; MLflow 3
keeps that backend in maintenance mode and asks for ``MLFLOW_ALLOW_FILE_STORE``, set here
for file URIs), W&B runs in offline mode unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from sane_ray import storage

RUN_TAG = "sane_ray.run_uri"
OFF = "none"  # the backend that logs nothing


@dataclass
class TrackingConfig:
    """Where a run's config and metrics are logged (``backend: none`` logs nothing)."""

    backend: str = OFF
    """Where to log: none, mlflow (pip install 'sane-ray[tracking]') or wandb (pip install wandb); others are refused."""
    uri: str = ""
    """MLflow tracking URI, or W&B's local directory; "": <cache>/mlruns (MLflow), <cache>/wandb (W&B)."""
    experiment: str = "sane-ray"
    """MLflow experiment / W&B project."""

    def __post_init__(self) -> None:
        backend(self.backend)  # an unknown name fails where the config is read, naming the valid ones


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config dict as ``{"dotted.key": "value"}`` (what trackers store as parameters)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = str(v)
    return out


class _MlflowTracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, run_uri: str, params: dict[str, str]):
        uri = cfg.uri or storage.join(storage.cache_dir(), "mlruns")
        if "://" not in uri or uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            path = uri.removeprefix("file://").removeprefix("file:")
            uri = "file://" + os.path.abspath(path)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_uri}'", max_results=1)
        if found:  # a resumed run continues its MLflow run
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={RUN_TAG: run_uri}).info.run_id
            from mlflow.entities import Param

            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class _WandbTracker:
    def __init__(self, cfg: TrackingConfig, run_name: str, run_uri: str, params: dict[str, str]):
        import wandb

        directory = cfg.uri or storage.join(storage.cache_dir(), "wandb")
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=cfg.experiment, name=run_name, config={**params, RUN_TAG: run_uri},
                              dir=directory, mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


Tracker = _MlflowTracker | _WandbTracker


@dataclass(frozen=True)
class Backend:
    """A tracking backend: the tracker it opens, the package that needs, and how to install it."""

    tracker: Callable[[TrackingConfig, str, str, dict[str, str]], Tracker]
    package: str
    install: str


# The one list of backends: the config, the driver's check and the train loop all read it.
BACKENDS: dict[str, Backend] = {
    "mlflow": Backend(_MlflowTracker, "mlflow", "pip install 'sane-ray[tracking]'"),
    "wandb": Backend(_WandbTracker, "wandb", "pip install wandb"),
}


def backend(name: str) -> Backend | None:
    """The registered backend ``name``, None for ``none``; any other name is refused, naming the valid ones."""
    if name == OFF:
        return None
    if name not in BACKENDS:
        raise ValueError(f"tracking.backend={name!r} is not a tracking backend; valid: {', '.join([OFF, *BACKENDS])}")
    return BACKENDS[name]


def check_tracking(cfg: TrackingConfig) -> None:
    """Refuse an unknown backend, or one whose package is not installed (before any worker starts)."""
    b = backend(cfg.backend)
    if b is not None and importlib.util.find_spec(b.package) is None:
        raise ValueError(f"tracking.backend={cfg.backend} needs the {b.package} package: {b.install}, "
                         f"or set tracking.backend={OFF}")


def open_tracker(spec: dict[str, Any] | None) -> Tracker | None:
    """The tracker of a run's ``tracking`` spec (built by the pretraining job); None when off.

    ``spec``: ``{"config": TrackingConfig as a dict, "run_name", "run_uri", "params"}``.
    """
    if not spec:
        return None
    cfg = TrackingConfig(**spec["config"])
    b = backend(cfg.backend)
    return None if b is None else b.tracker(cfg, spec["run_name"], spec["run_uri"], spec["params"])
