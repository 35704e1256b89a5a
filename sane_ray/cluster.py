"""Ray start-up and capacity checks: the one place a job attaches to or starts a cluster.

Jobs call :func:`ensure_ray` (attach to ``RAY_ADDRESS`` or an initialized Ray, else start
a local cluster) and then :func:`check_capacity`, so a run the cluster can never schedule
fails with one line before any worker starts, instead of waiting forever.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from sane_ray.data.config import DataConfig
    from sane_ray.pretrain import RunSettings

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Connect to the cluster (``RAY_ADDRESS`` / a job's cluster) or start a local one.

    ``num_cpus`` and ``object_store_memory`` apply only to a local cluster started here.
    Without ``RAY_ADDRESS`` a new local cluster is started even if another one runs on
    this machine: a bare ``ray.init()`` would attach to the latest one started (someone
    else's, maybe), and then refuse ``num_cpus``.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory)


def local_cpus(run: RunSettings, data: DataConfig) -> int:
    """Logical CPUs for a local cluster that runs ``run`` over ``data``.

    More than the cores: Train workers and Data actors must all be placeable at once, or
    Ray Data waits forever for an actor slot.
    """
    need = run.workers * run.cpus_per_worker + data.num_actors * data.actor_cpus + data.stream_cpus + 1
    return run.local_cpus or max(4, math.ceil(need))


def check_local_capacity(run: RunSettings) -> None:
    """Refuse, before a local cluster is started, more workers than this machine's cores.

    A local cluster is sized to fit the request, so :func:`check_capacity` would pass,
    and the machine would run out of memory instead.
    """
    cores = run.local_cpus or os.cpu_count() or 1
    need = run.workers * run.cpus_per_worker
    if need > cores + 1e-9:
        what = f"run.local_cpus={run.local_cpus}" if run.local_cpus else f"this machine has {cores} CPU cores"
        raise ValueError(
            f"{run.workers} workers x {run.cpus_per_worker:g} CPU need {need:g} CPU, but {what} and no cluster "
            "is given (RAY_ADDRESS); lower run.workers or run.cpus_per_worker, or run on a cluster"
        )


def ensure_ray_for(run: RunSettings, data: DataConfig) -> None:
    """:func:`ensure_ray` with a local cluster sized for a pretraining run (refused if it cannot fit)."""
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_local_capacity(run)
    ensure_ray(num_cpus=local_cpus(run, data), object_store_memory=LOCAL_OBJECT_STORE_BYTES)


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
