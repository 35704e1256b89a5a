"""Which node type each stage runs on: CPU nodes for data work, GPU nodes for training.

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

from typing import Any, Literal

import ray

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
