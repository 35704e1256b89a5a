"""Ray start-up, capacity checks and placement: the one place a job meets its cluster.

Jobs call :func:`ensure_ray` (attach to ``RAY_ADDRESS`` or an initialized Ray, else start
a local cluster) and then :func:`check_capacity`, so a run the cluster can never schedule
fails with one line before any worker starts, instead of waiting forever.

Placement: which node type each stage runs on, CPU nodes for data work, GPU nodes for
training.

A cluster with node types declares one custom resource per type on every node of it
(``sane_cpu_node`` / ``sane_gpu_node``, see ``cluster/``). Each stage asks for a tiny
amount (:data:`MARKER`) of its node type's resource on top of its CPUs and GPUs, so it is
only placed on nodes of that type and the autoscaler sees the demand of each stage as a
demand for its own node type. The marker never limits concurrency: a node holds one unit,
room for a thousand stages at once, and its CPUs and GPUs still decide how many fit.

``node_types=False`` (the default, one machine or an untyped cluster) asks for CPUs and
GPUs only. Every job takes the setting from its config and gets its remote arguments
here: the Ray Data preprocessing and window tasks (``kind="cpu"``), the Ray Train workers
(:func:`worker_resources`), and the CPU and GPU parts of the probe and sampling jobs.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Literal

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
    port = free_port()
    point_state_api_at(port)
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=True, dashboard_port=port)


def free_port() -> int:
    """A TCP port free on this machine now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_state_api_at(dashboard_port: int) -> None:
    """Make Ray's State API in every process of the local cluster about to start use its dashboard.

    Without an address the State API looks for a local cluster by its processes and fails when
    another Ray cluster runs on the machine ("Found multiple active Ray instances"). Train V2's
    placement-group cleaner uses it: there it dies, and the worker placement group of a trial
    ASHA stops is never removed, so later trials wait for CPUs forever. The variable is set
    before ``ray.init`` so the raylet, and every worker it starts, inherits it.
    """
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"


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


# ---------------------------------------------------------------- placement

CPU_NODE = "sane_cpu_node"
GPU_NODE = "sane_gpu_node"
MARKER = 0.001  # of a node type's resource per task, actor or worker (Ray's granularity is 1e-4)

NodeKind = Literal["cpu", "gpu"]
RESOURCE: dict[str, str] = {"cpu": CPU_NODE, "gpu": GPU_NODE}


def remote_args(kind: NodeKind, num_cpus: float, num_gpus: float = 0.0, *, node_types: bool) -> dict[str, Any]:
    """Ray remote arguments for a task or actor of a ``kind`` stage.

    They fit ``ray.remote(**args)``, ``.options(**args)`` and ``Dataset.map_batches(**args)``.
    """
    if kind not in RESOURCE:
        raise ValueError(f"node kind must be one of {sorted(RESOURCE)}, got {kind!r}")
    args: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        args["num_gpus"] = num_gpus
    if node_types:
        args["resources"] = {RESOURCE[kind]: MARKER}
    return args


def worker_resources(num_cpus: float, num_gpus: float = 0.0, *, node_types: bool) -> dict[str, float]:
    """``ScalingConfig.resources_per_worker`` of a Ray Train worker (a GPU-node stage)."""
    resources = {"CPU": num_cpus}
    if num_gpus:
        resources["GPU"] = num_gpus
    if node_types:
        resources[GPU_NODE] = MARKER
    return resources


def check_node_types(node_types: bool, autoscaling: bool) -> None:
    """Refuse typed placement on a cluster without both node types: its stages would wait forever.

    An autoscaling cluster may start with no worker nodes: it adds them on demand.
    """
    if not node_types or autoscaling:
        return
    have = ray.cluster_resources()
    missing = [r for r in (CPU_NODE, GPU_NODE) if have.get(r, 0.0) <= 0]
    if missing:
        raise ValueError(
            f"run.node_types=true places stages on nodes declaring {CPU_NODE} and {GPU_NODE}, but no node "
            f"of this cluster declares {' or '.join(missing)}; set run.node_types=false on one machine, "
            "declare the resources on the nodes (ray start --resources, see cluster/), "
            "or set run.autoscaling=true on an autoscaling cluster"
        )
