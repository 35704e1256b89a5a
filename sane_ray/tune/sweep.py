"""Hyperparameter sweeps: Ray Tune trials, each a full Ray Train pretraining run.

:func:`run_sweep` checks everything it can before any trial starts (search space, objective,
cluster capacity, every corner of the space against the zoo), builds the canonical zoo
once per distinct preprocessing setting, and runs a ``Tuner`` whose trials call
:func:`sane_ray.pretrain.run_pretrain` with Tune's ``TuneReportCallback`` (Tune + Train V2:
the trial function launches a ``TorchTrainer`` and its reports reach the scheduler).
ASHA stops weak trials at rungs of the ``epoch`` metric.

The sweep directory ``<out>/<name>`` holds Tune's experiment state, the trials' run
directories (``trials/<trial_id>``, each a normal pretraining run) and the results
(:mod:`sane_ray.tune.results`). Rerunning the same sweep (same ``out`` and ``name``)
restores it with ``Tuner.restore``: finished trials are kept, unfinished ones continue
from their newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import time
from typing import Any, Sequence


from sane_ray import lease, storage
from sane_ray.cluster import Plan, ensure_ray_for, fits_at_once, worker_resources
from sane_ray.config import ConfigError, dump_config, from_dict, to_dict, with_values
from sane_ray.pretrain import prepare_run, size_run
from sane_ray.pretrain_config import PretrainConfig
from sane_ray.tune.config import OBJECTIVES, SweepConfig
from sane_ray.tune.results import write_results
from sane_ray.tune.space import Dimension, parse_space, preprocessing_settings

log = logging.getLogger(__name__)
SWEEP_CONFIG = "sweep_config.yaml"
TRIALS = "trials"


class SweepInterruptedError(RuntimeError):
    """The sweep stopped before every trial finished; rerunning it resumes."""


def default_sweeps_dir() -> str:
    return os.path.join(storage.cache_dir(), "sweeps")


def sweep_uri(cfg: SweepConfig) -> str:
    return storage.join(storage.parse_uri(cfg.out or default_sweeps_dir()).uri, cfg.name)


def trial_need(cfg: SweepConfig) -> tuple[float, float]:
    """(CPU, GPU) one trial holds: its Tune process, its Train workers and one data-stream task."""
    run, data = cfg.pretrain.run, cfg.pretrain.data
    return cfg.trial_cpus + run.workers * run.cpus_per_worker + data.stream_cpus, run.workers * run.gpus_per_worker


def size_trials(cfg: SweepConfig) -> tuple[SweepConfig, Plan]:
    """``cfg`` with each trial's run sized to its share of the cluster (``max_concurrent`` trials, default 1).

    Every trial then runs exactly the base's sizes (a trial's own run plans nothing), and the
    plan refuses, in one line, more concurrent trials than the cluster holds.
    """
    pretrain, plan = size_run(cfg.pretrain, trials=cfg.max_concurrent or 1, trial_cpus=cfg.trial_cpus)
    return dataclasses.replace(cfg, pretrain=pretrain), plan


def concurrency(cfg: SweepConfig) -> int:
    """Trials at once: ``cfg.max_concurrent`` (checked by :func:`size_trials`), or as many as fit."""
    return min(cfg.max_concurrent or max(fits_at_once(*trial_need(cfg)), 1), cfg.samples)


def check_objective(cfg: SweepConfig, dims: list[Dimension]) -> None:
    """Refuse an objective that no trial would report, from the settings alone."""
    if cfg.objective == "probe_r2":
        probe = next((d for d in dims if d.key == "train.probe_every"), None)
        every = probe.corners() if probe else [cfg.pretrain.train.probe_every]
        if min(every) < 1:
            raise ValueError("objective probe_r2 (val_probe_r2) is reported only with pretrain.train.probe_every >= 1 "
                             "(1: every epoch, as ASHA compares trials at every rung)")


def _check_splits(cfg: SweepConfig, prepared: Any) -> None:
    """Refuse an objective that the zoo's split leaves without data."""
    splits, zoo = prepared.splits, prepared.canonical.zoo_uri
    if not splits.get("val"):
        raise ValueError(f"objective {cfg.objective} is measured on validation models, but the split of {zoo} has "
                         "none; raise the val share of pretrain.data.split_fractions")
    if cfg.objective == "probe_r2" and len(splits.get("train", [])) < 2:
        raise ValueError(f"objective probe_r2 needs at least 2 training models to fit the probe, {zoo} has "
                         f"{len(splits.get('train', []))}")


def check_sweep(cfg: SweepConfig) -> tuple[list[Dimension], PretrainConfig]:
    """Every check that needs no trial, and the shared preprocessing; returns the space and the base run.

    Each distinct preprocessing setting of the space is prepared once (built, or found in
    the canonical cache); every option and both ends of every range are checked against
    the zoo on the base configuration, one key at a time.
    """
    dims = parse_space(cfg.space, PretrainConfig)
    base = cfg.pretrain
    if not base.data.zoo_uri:
        from sane_ray.zoo.generate import zoo_or_default

        base = with_values(base, {"data.zoo_uri": zoo_or_default("", base.run.node_types)})
    settings = preprocessing_settings(dims)
    for setting in settings:
        run = prepare_run(with_values(base, setting))
        _check_splits(cfg, run.prepared)
    pipeline_log = logging.getLogger("sane_ray.data.pipeline")
    level = pipeline_log.level
    pipeline_log.setLevel(logging.WARNING)  # one "reusing the canonical zoo" line per corner says nothing new
    try:
        for d in (d for d in dims if d.key not in settings[0]):
            for value in d.corners():
                prepare_run(with_values(base, {d.key: value}))
    finally:
        pipeline_log.setLevel(level)
    return dims, base


def base_point(dims: list[Dimension], base: PretrainConfig) -> dict[str, Any] | None:
    """The base configuration's values of the searched keys, or None if it lies outside the space."""
    flat = to_dict(base)
    point = {}
    for d in dims:
        value: Any = flat
        for part in d.key.split("."):
            value = value[part]
        value = tuple(value) if isinstance(value, list) else value
        if not d.contains(value):
            return None
        point[d.key] = value
    return point


def _trial(params: dict[str, Any], base: dict[str, Any], trials_uri: str) -> None:
    """One trial, in a Tune trial process: the base run with the trial's values, reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sane_ray.pretrain import run_pretrain

    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(from_dict(PretrainConfig, base), {**params, "run.out": trials_uri, "run.name": trial_id})
    run_pretrain(cfg, callbacks=[TuneReportCallback()])


def _check_resume(uri: str, cfg: SweepConfig) -> None:
    """Refuse to resume a sweep that was started with another config (Tune would mix the two)."""
    path = storage.join(uri, SWEEP_CONFIG)
    if not storage.exists(path):
        return
    import yaml

    theirs = yaml.safe_load(storage.read_bytes(path)) or {}
    ours = to_dict(cfg)
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        raise ConfigError(f"the sweep at {uri} was started with another config (differs in: {', '.join(diff)}); "
                          "rerun it with the same config to resume, or give another name")


def run_sweep(cfg: SweepConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run (or resume) the sweep and write its results; returns the best trial's row.

    ``callbacks`` are extra Tune callbacks (progress, tests). Raises :class:`SweepInterruptedError`
    when the sweep stops before every trial finished (rerun to resume).
    """
    check_objective(cfg, parse_space(cfg.space, PretrainConfig))  # before Ray starts: these fail at once
    if cfg.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ValueError("search=optuna needs the optuna package: pip install 'sane-ray[optuna]', or use search=random")
    uri = sweep_uri(cfg)
    _check_resume(uri, cfg)
    with lease.acquire(uri, "tune"):  # one sweep writes the directory; taken before Ray starts
        return _sweep(cfg, uri, callbacks)


def _searcher(cfg: SweepConfig, point: dict[str, Any] | None, limit: int) -> Any:
    """Tune's search algorithm for ``cfg.search``, trying the base point first when there is one."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(points_to_evaluate=[point] if point else None, seed=cfg.seed)
    # A SearchGenerator: Tune ignores max_concurrent_trials for it, so it gets the limit itself.
    return BasicVariantGenerator(points_to_evaluate=[point] if point else None, random_state=cfg.seed,
                                 max_concurrent=limit)


def _scheduler(cfg: SweepConfig, dims: list[Dimension], base: PretrainConfig) -> Any:
    """ASHA over epochs (up to the most any trial trains), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler != "asha":
        return FIFOScheduler()
    epoch_dim = next((d for d in dims if d.key == "train.epochs"), None)
    epochs = max(epoch_dim.corners()) if epoch_dim else base.train.epochs
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(cfg.grace_period, epochs),
                         reduction_factor=cfg.reduction_factor)


def _new_tuner(cfg: SweepConfig, dims: list[Dimension], base: PretrainConfig, point: dict[str, Any] | None,
               limit: int, trainable: Any, path: str, fs: Any, callbacks: Sequence[Any]) -> Any:
    """A fresh ``Tuner`` over the space: its search, scheduler, concurrency and where it keeps state."""
    from ray import tune

    metric, mode = OBJECTIVES[cfg.objective]
    return tune.Tuner(
        trainable,
        param_space={d.key: d.tune_domain() for d in dims},
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=cfg.samples, search_alg=_searcher(cfg, point, limit),
            scheduler=_scheduler(cfg, dims, base),
            max_concurrent_trials=limit if cfg.search == "optuna" else None,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=os.path.dirname(path.rstrip("/")), storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=0), callbacks=list(callbacks), verbose=1,
        ),
    )


def _sweep(cfg: SweepConfig, uri: str, callbacks: Sequence[Any]) -> dict[str, Any]:
    """The sweep inside its lease on ``uri``."""
    from ray import tune

    given, pretrain = cfg, cfg.pretrain
    ensure_ray_for(pretrain.run, pretrain.data, pretrain.train.num_threads, cfg.max_concurrent or 1, cfg.trial_cpus)
    cfg, plan = size_trials(cfg)
    limit = concurrency(cfg)
    dims, base = check_sweep(cfg)
    metric, mode = OBJECTIVES[cfg.objective]
    fs, path = storage.pyarrow_fs(uri)
    point = base_point(dims, base) if cfg.include_base else None
    trials_uri = storage.join(uri, TRIALS)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), trials_uri=trials_uri),
        worker_resources(cfg.trial_cpus, node_types=base.run.node_types))

    storage.makedirs(uri)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        log.info("resuming the sweep at %s: finished trials are kept", uri)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, storage_filesystem=fs)
        # Restore brings back the callbacks pickled with the first invocation; this process's replace them
        # (Tuner.restore takes no RunConfig; the run config is reachable on the local tuner only).
        tuner._local_tuner.get_run_config().callbacks = list(callbacks)
    else:
        storage.write_bytes_atomic(storage.join(uri, SWEEP_CONFIG), dump_config(given).encode())
        tuner = _new_tuner(cfg, dims, base, point, limit, trainable, path, fs, callbacks)
    log.info("%s", plan.line())
    log.info("sweep %s: %d trials, %d at once, %s + %s, objective %s (%s)",
             cfg.name, cfg.samples, limit, cfg.search, cfg.scheduler, metric, mode)
    start = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - start
    # The state as saved, not the grid: on an interrupt Tune saves first and then stops (and marks
    # terminated) the trials still running; the saved state keeps them resumable.
    saved = tune.ExperimentAnalysis(path, storage_filesystem=fs).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in saved)
    if done < cfg.samples:
        raise SweepInterruptedError(f"the sweep at {uri} stopped with {done} of {cfg.samples} trials finished; "
                                    "rerun the same command to resume it")
    best = write_results(grid, cfg, dims, base, point, uri, trials_uri, wall)
    print(f"\nSweep finished. Results: {uri}/summary.md, best config: {uri}/best_config.yaml")
    return best
