"""Ray start-up, capacity checks and placement: the one place a job meets its cluster.

Jobs call :func:`ensure_ray` (attach to ``RAY_ADDRESS`` or an initialized Ray, else start
a local cluster at Ray's default size, as ``ray start --head`` would). A pretraining run
(or a sweep's trials) is then sized to the cluster it met (:func:`plan_run`): what the user
left at 0 is filled in to fit, what they gave is kept, and a run the cluster can never
schedule fails with one line before any worker starts, instead of waiting forever.

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
here: zoo generation, the Ray Data preprocessing and window tasks (``kind="cpu"``), the Ray
Train workers and sweep trials (:func:`worker_resources`), the zoo-embedding actors and the
sampling tasks (CPU or GPU).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Protocol, Sequence

import ray

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


class DataShares(Protocol):
    """What a plan needs of the data section (``sane_ray.data.config.DataConfig``): its CPU shares."""

    stream_cpus: float
    actor_cpus: float


@dataclass
class RunSettings:
    """A run's ``run`` section: where it lives and what it runs on (the cluster's to plan, hence here)."""

    name: str = "sane-digits"
    """The run's directory under out; rerunning with the same name resumes it."""
    out: str = ""
    """Storage for checkpoints and results (path or s3://); "": ~/.cache/sane-ray/runs."""
    workers: int = 0
    """Train workers; 0: sized to the cluster (sane_ray.cluster.plan_run: one per node, or per GPU)."""
    gpus_per_worker: float = 0.0
    """GPUs per Train worker (fractions share a GPU); 0: train on CPUs."""
    cpus_per_worker: float = 0.0
    """Logical CPUs per Train worker; 0: the largest share that fits next to the data stream."""
    autoscaling: bool = False
    """The cluster may grow (autoscaler): skip the check that it can hold every worker now."""
    node_types: bool = False
    """Data stages on nodes declaring sane_cpu_node, Train workers on sane_gpu_node nodes
    (sane_ray.cluster, cluster/); false: anywhere, as on one machine."""
    local_cpus: int = 0
    """Logical CPUs for a local cluster started by this job (0: Ray's default, as `ray start --head`)."""


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


def ensure_ray_for(run: RunSettings, data: DataShares, threads: int = 0, trials: int = 1,
                   trial_cpus: float = 0.0) -> None:
    """:func:`ensure_ray` for a pretraining run (or ``trials`` at once): a local cluster at Ray's
    default size (``run.local_cpus`` if set), the one a bare ``ray start --head`` makes.

    What cannot fit this machine is refused before a local cluster starts.
    """
    check_local_fit(run, data, threads, trials, trial_cpus)
    ensure_ray(num_cpus=run.local_cpus or None, object_store_memory=LOCAL_OBJECT_STORE_BYTES)


def check_local_fit(run: RunSettings, data: DataShares, threads: int = 0, trials: int = 1,
                    trial_cpus: float = 0.0) -> None:
    """Refuse, without starting anything, a run that the local cluster this process would start
    cannot hold (a no-op when attached to a cluster or when ``RAY_ADDRESS`` names one): jobs call
    it before taking their lease."""
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        where = f"a local cluster of run.local_cpus={run.local_cpus}" if run.local_cpus else "this machine"
        plan_run(run, data, threads, local_nodes(run), trials, trial_cpus, where=f"{where} (no RAY_ADDRESS)")


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every alive node of the cluster this process is attached to."""
    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def local_nodes(run: RunSettings) -> list[dict[str, float]]:
    """The one node of a local cluster not yet started: the machine's cores (``run.local_cpus`` if set)
    and its visible GPUs. Ray may detect fewer CPUs (a cgroup quota); the plan on the started cluster
    then uses those."""
    import torch

    return [{"CPU": float(run.local_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


# Below this share a Train worker is a rounding error of its node: such a plan is refused, not run.
MIN_WORKER_CPUS = 0.25
_EPS = 1e-9


@dataclass(frozen=True)
class Plan:
    """What a pretraining run (a sweep: each of ``trials`` runs at once) takes of its cluster."""

    cpus: float  # the cluster's logical CPUs
    gpus: float
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int  # torch threads per worker
    stream_cpus: float
    trials: int = 1
    trial_cpus: float = 0.0
    autoscaling: bool = False

    def line(self) -> str:
        """The plan in one line, e.g. "2 CPUs: 1 Train worker x 2 threads (1.5 CPU), stream 0.5 CPU"."""
        where = f"{self.cpus:g} CPUs" + (f", {self.gpus:g} GPUs" if self.gpus else "")
        if self.autoscaling:
            where = f"autoscaling cluster (now {where})"
        if self.trials > 1:
            where += f" / {self.trials} trials at once"
        gpu = f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        each = " each" if self.workers > 1 else ""
        line = (f"{where}: {self.workers} Train worker{'s' * (self.workers > 1)} x {self.threads} "
                f"thread{'s' * (self.threads > 1)} ({self.cpus_per_worker:g} CPU{gpu}{each}), "
                f"stream {self.stream_cpus:g} CPU")
        return line + (f", trial {self.trial_cpus:g} CPU" if self.trial_cpus else "")


def plan_run(run: RunSettings, data: DataShares, threads: int, nodes: Sequence[Mapping[str, float]],
             trials: int = 1, trial_cpus: float = 0.0, where: str = "the cluster") -> Plan:
    """Size a run to ``nodes``: what the user left at 0 is filled in, what they gave is kept.

    Left at 0, ``run.workers`` is one worker per node that can hold one (one per GPU with
    ``run.gpus_per_worker``), ``run.cpus_per_worker`` the largest share every worker gets
    (the data stream's and the trial's CPUs set aside on the largest node) and ``threads``
    that share rounded up. Each of ``trials`` runs at once plans on its share of every node.
    Raises ``ValueError`` (one line) for a run that cannot fit, naming the settings to change;
    an autoscaling cluster is never refused (it grows), and unsized values are 1 there.
    ``where`` names ``nodes`` in the refusal.
    """
    cpus, gpus = (sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU"))
    gpw, stream = run.gpus_per_worker, data.stream_cpus
    if run.autoscaling:
        share = run.cpus_per_worker or 1.0
        return Plan(cpus, gpus, run.workers or 1, share, gpw, threads or math.ceil(share - _EPS), stream,
                    trials, trial_cpus, autoscaling=True)
    hint = "or set run.autoscaling=true on an autoscaling cluster"
    # Each trial's share of each node that may hold a Train worker, largest first.
    pool = sorted(((n.get("CPU", 0.0) / trials, n.get("GPU", 0.0) / trials) for n in nodes
                   if not run.node_types or n.get(GPU_NODE, 0.0) > 0), reverse=True)
    reserve = trial_cpus + (0.0 if run.node_types else stream)  # typed clusters draw windows on CPU nodes
    if pool:
        pool[0] = (pool[0][0] - reserve, pool[0][1])

    def slots(share: float) -> int:
        """Workers of ``share`` CPU (and ``gpw`` GPU) that the pool holds."""
        return sum(min(math.floor(c / share + _EPS), math.floor(g / gpw + _EPS) if gpw else workers) for c, g in pool)

    workers = run.workers or (sum(math.floor(g / gpw + _EPS) for _, g in pool) if gpw
                              else sum(c >= MIN_WORKER_CPUS - _EPS for c, _ in pool))
    named = f"{workers or 1} worker{'s' * (workers > 1)}"
    if gpw and (not workers or workers * gpw > gpus / trials + _EPS):
        raise ValueError(f"{named} x {gpw:g} GPU need {(workers or 1) * gpw * trials:g} GPU, but {where} has "
                         f"{gpus:g}; lower run.workers or run.gpus_per_worker, {hint}")
    share = run.cpus_per_worker
    if not share and workers:  # the largest share that every worker gets on some node
        fits = [s for s in (c / k for c, _ in pool if c > 0 for k in range(1, workers + 1)) if slots(s) >= workers]
        share = math.floor(round(max(fits, default=0.0) * 100, 6)) / 100
    if not workers or (not run.cpus_per_worker and share < MIN_WORKER_CPUS - _EPS) or slots(share) < workers:
        each = f"{share:g}" if run.cpus_per_worker else f"at least {MIN_WORKER_CPUS:g}"
        what = f"{named} x {each} CPU plus {stream:g} CPU for the data stream"
        need = (workers or 1) * (run.cpus_per_worker or MIN_WORKER_CPUS) + stream + trial_cpus
        if trial_cpus:
            what += f" and {trial_cpus:g} for the trial"
        if trials > 1:
            what, need = f"{trials} concurrent trials x ({what})", need * trials
        spread = "" if need > cpus + _EPS else " on nodes that cannot hold them all"
        raise ValueError(f"{what} need {need:g} CPU, but {where} has {cpus:g}{spread}; lower run.workers, "
                         f"run.cpus_per_worker or data.stream_cpus, {hint}")
    if data.actor_cpus > max((n.get("CPU", 0.0) for n in nodes), default=0.0) + _EPS:
        raise ValueError(f"data.actor_cpus={data.actor_cpus:g} exceeds every node's CPUs of {where}; lower it, {hint}")
    return Plan(cpus, gpus, workers, share, gpw, threads or math.ceil(share - _EPS), stream, trials, trial_cpus)


def task_plan(what: str, tasks: int, num_cpus: float, num_gpus: float = 0.0) -> str:
    """The plan of a job of ``tasks`` Ray tasks in one line: Ray runs as many at once as the attached
    cluster holds (e.g. "2 CPUs: 48 model-training tasks, up to 2 at once x 1 CPU")."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    at_once = min(tasks, fits_at_once(num_cpus, num_gpus))
    where = f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
    gpu = f" + {num_gpus:g} GPU" if num_gpus else ""
    return f"{where}: {tasks} {what} task{'s' * (tasks != 1)}, up to {at_once} at once x {num_cpus:g} CPU{gpu}"


def fits_at_once(num_cpus: float, num_gpus: float = 0.0) -> int:
    """How many tasks (or sweep trials) of ``num_cpus`` CPUs and ``num_gpus`` GPUs the attached
    cluster's totals hold at once; GPUs bound it only when each needs some."""
    total = ray.cluster_resources()
    by_cpu = math.floor(total.get("CPU", 0.0) / num_cpus + _EPS)
    return min(by_cpu, math.floor(total.get("GPU", 0.0) / num_gpus + _EPS)) if num_gpus else by_cpu


def gpu_share(share: float) -> float:
    """``share`` of a GPU when the attached cluster has a GPU, else 0: what a job's GPU stage asks
    for when its config leaves the GPU to the cluster."""
    return share if ray.cluster_resources().get("GPU", 0.0) >= 1 else 0.0


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
    """``ScalingConfig.resources_per_worker`` of a Ray Train worker, or a sweep trial's resources
    (GPU-node stages both: :func:`plan_run` sets their CPUs aside there)."""
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
