"""The main job: zoo -> canonical tokens (Ray Data) -> SANE pretraining (Ray Train + FSDP2).

:class:`~sane_ray.pretrain_config.PretrainConfig` is the whole run as one typed tree (``data``,
``train`` with its ``model``, ``run``). :func:`run_pretrain` goes validate -> lease -> start Ray -> work:

1. :func:`check_run`: the settings, where the run goes (scheme), the zoo (published
   there, not empty), from listings alone;
2. the run directory's lease (:mod:`sane_ray.lease`; creating it also proves the
   location is reachable and writable), then the resume state
   (:func:`sane_ray.train.resume.preflight`);
3. only then Ray, the zoo's contents, the canonical cache and the workers.

So a second run into the same directory, an unusable ``--out`` or a missing zoo is
refused in seconds, before Ray starts. Every mistake a user can make in the config is
reported in one line, rather than from inside a worker.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from sane_ray import lease, storage
from sane_ray.cluster import (
    Plan,
    check_local_fit,
    check_node_types,
    cluster_nodes,
    ensure_ray_for,
    plan_run,
    worker_resources,
)
from sane_ray.config import dump_config, to_dict
from sane_ray.pretrain_config import (
    PretrainConfig,
    check_data_facts,
    check_run_settings,
    model_for_data,
    runs_dir,
)
from sane_ray.train.tracking import check_tracking, flat_params

log = logging.getLogger("sane_ray.pretrain")


def size_run(cfg: PretrainConfig, nodes: Sequence[Mapping[str, float]] | None = None, trials: int = 1,
             trial_cpus: float = 0.0) -> tuple[PretrainConfig, Plan]:
    """``cfg`` with its workers, CPUs per worker and threads from :func:`plan_run` on ``nodes``
    (default: the attached cluster's), and the plan."""
    plan = plan_run(cfg.run, cfg.data, cfg.train.num_threads, cluster_nodes() if nodes is None else nodes,
                    trials, trial_cpus)
    run = dataclasses.replace(cfg.run, workers=plan.workers, cpus_per_worker=plan.cpus_per_worker)
    return dataclasses.replace(cfg, run=run, train=dataclasses.replace(cfg.train, num_threads=plan.threads)), plan


@dataclass
class PreparedRun:
    """A run checked against its zoo and cluster, its data prepared: what :func:`run_pretrain` trains."""

    cfg: PretrainConfig  # resolved: the plan's sizes, zoo URI, model sizes, steps per epoch and probe data filled in
    plan: Plan  # how the run was sized to its cluster
    prepared: Any  # sane_ray.data.pipeline.PreparedData
    out: str  # the runs directory (URI)
    run_uri: str


def check_run(cfg: PretrainConfig) -> str:
    """Every check that needs neither Ray nor the zoo's contents; returns the run directory's URI."""
    from sane_ray.zoo.reader import check_zoo

    check_run_settings(cfg.run)
    check_data_facts(cfg)
    check_tracking(cfg.tracking)
    check_local_fit(cfg.run, cfg.data, cfg.train.num_threads)  # the local cluster this run would start
    if not cfg.run.name or "/" in cfg.run.name:
        raise ValueError(f"run.name must be a non-empty name without '/', got {cfg.run.name!r}")
    out = runs_dir(cfg.run)
    if cfg.data.cache_uri:
        storage.parse_uri(cfg.data.cache_uri)
    if cfg.data.zoo_uri:
        check_zoo(cfg.data.zoo_uri)
    return storage.join(out, cfg.run.name)


def start_ray(cfg: PretrainConfig) -> None:
    """Attach to the cluster or start a local one at Ray's default size, refusing what cannot fit it."""
    from ray.data import DataContext

    from sane_ray.data.stream import quiet_data_context

    ensure_ray_for(cfg.run, cfg.data, cfg.train.num_threads)
    quiet_data_context(DataContext.get_current(), cfg.data.progress_bars)
    check_node_types(cfg.run.node_types, cfg.run.autoscaling)


def prepare_run(cfg: PretrainConfig) -> PreparedRun:
    """Check ``cfg``, start Ray, size it to the cluster and build (or reuse) the canonical zoo.

    Every mistake a user can make in the config fails here, before any worker starts.
    """
    run_uri = check_run(cfg)
    start_ray(cfg)
    return _prepare(cfg, run_uri)


def _prepare(cfg: PretrainConfig, run_uri: str) -> PreparedRun:
    """With Ray up: the plan, the zoo (the built-in one generated on first use), the canonical zoo,
    the resolved config."""
    from sane_ray.data.pipeline import prepare_data
    from sane_ray.train.trainer import steps_per_epoch

    cfg, plan = size_run(cfg)
    from sane_ray.zoo.generate import zoo_or_default

    data_cfg = dataclasses.replace(cfg.data, zoo_uri=zoo_or_default(cfg.data.zoo_uri, cfg.run.node_types))

    prepared = prepare_data(data_cfg, node_types=cfg.run.node_types)
    model = model_for_data(cfg.train.model, prepared.token_size, prepared.window_size, prepared.pad_position)
    # Steps from the known window count: counting the dataset would run a whole pass.
    train = prepared.streams["train"]
    steps = cfg.train.steps_per_epoch or steps_per_epoch(
        train.rows_per_rank(cfg.train.seed, cfg.run.workers) * cfg.run.workers, cfg.run.workers, cfg.train.batch_size)
    train_cfg = dataclasses.replace(cfg.train, model=model, steps_per_epoch=steps)
    resolved = dataclasses.replace(cfg, data=data_cfg, train=train_cfg)
    return PreparedRun(resolved, plan, prepared, runs_dir(cfg.run), run_uri)


def run_pretrain(
    cfg: PretrainConfig, on_epoch_end: Callable[[int, int], None] | None = None, callbacks: Sequence[Any] = (),
) -> Any:
    """Run the whole job; returns Ray Train's ``Result`` (``result.return_value``: history).

    Validate, lease, then work (module doc): a run that cannot go anywhere fails before Ray starts.
    ``on_epoch_end(rank, epoch)`` runs on every worker after each epoch (logging, fault injection);
    ``callbacks`` are Ray Train callbacks (a sweep trial forwards reports to Tune with one).
    """
    from sane_ray.train import resume

    run_uri = check_run(cfg)
    with lease.acquire(run_uri, "pretraining"):
        resume.preflight(run_uri)
        start_ray(cfg)
        return _train(_prepare(cfg, run_uri), on_epoch_end, callbacks)


def _train(run: PreparedRun, on_epoch_end: Callable[[int, int], None] | None, callbacks: Sequence[Any]) -> Any:
    """Train and export a prepared run whose directory this process has leased and checked."""
    from sane_ray.embed.preprocess import run_export_files
    from sane_ray.train.trainer import train_sane

    cfg, prepared = run.cfg, run.prepared
    log.info("%s", run.plan.line())
    log.info("pretraining %s: windows per pass %s, run dir %s", cfg.data.zoo_uri, prepared.num_windows, run.run_uri)
    export_files = {"pretrain_config.yaml": dump_config(cfg).encode(), **run_export_files(prepared)}
    resources = worker_resources(cfg.run.cpus_per_worker, cfg.run.gpus_per_worker, node_types=cfg.run.node_types)
    tracking = {"config": to_dict(cfg.tracking), "run_name": cfg.run.name, "run_uri": run.run_uri,
                "params": flat_params(to_dict(cfg))}
    signal = None
    if cfg.train.probe_every:  # scikit-learn and the embedding path: imported only when asked for
        from sane_ray.probe.signal import probe_signal

        signal = functools.partial(probe_signal, uri=prepared.cache_uri, seed=cfg.train.seed)
    result = train_sane(
        cfg.train,
        {k: v for k, v in prepared.streams.items() if k in ("train", "val")},
        storage_path=run.out,
        name=cfg.run.name,
        num_workers=cfg.run.workers,
        use_gpu=cfg.run.gpus_per_worker > 0,
        resources_per_worker=resources,
        export_files=export_files,
        on_epoch_end=on_epoch_end,
        epoch_signal=signal,
        tracking=tracking,
        callbacks=callbacks,
        leased=True,
    )
    log.info("done: model, loss curve and summary in %s", run.run_uri)
    print(f"\nSANE pretraining finished. Results: {run.run_uri}/summary.md, {run.run_uri}/loss_curve.png")
    return result
