"""The node types of sane-ray's clusters: one definition that every cluster file follows.

``cluster/aws.yaml``'s ``available_node_types`` is rendered from :data:`NODE_TYPES`
(``python tools/cluster_files.py``); ``cluster/kuberay-cluster.yaml``'s groups and the AWS file
are checked against them (``tests/test_cluster_files.py``); and the local autoscaling cluster
that ``tests/test_autoscaling.py`` scales is :func:`fake_cluster_config`, the same types scaled
down to one machine. So the node types that the stages ask for (:mod:`sane_ray.cluster`'s
markers) are the node types each cluster has, and they cannot drift apart file by file.

Scaling to one machine (:func:`local_resources`): every type keeps its name, its marker resource
and whether it runs stages; its CPUs and its ``max_workers`` are divided by :data:`LOCAL_SCALE`
and rounded up (the types keep their order of size), its GPUs are dropped (the GPU type is a CPU
node that declares ``sane_gpu_node``, so CPU training runs there), and its object store is small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sane_ray.cluster import CPU_NODE, GPU_NODE

LOCAL_SCALE = 16  # one machine's node is a sixteenth of a cloud node (CPUs, max_workers)
LOCAL_NODE_STORE_BYTES = 150 * 1024**2  # per local node: the tiny zoos it runs need little
AMI = "ami-0a0b1c2d3e4f5a6b7"  # Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04); replace per region
DISK_GIB = 200


@dataclass(frozen=True)
class NodeType:
    """A node type: what Ray sees on its nodes, how many the autoscaler may start, and the AWS
    instance (and KubeRay group) that provides it."""

    name: str  # the node type in aws.yaml and in the local cluster
    role: str  # what runs there, one line (the comment in aws.yaml)
    marker: str | None  # the placement resource its nodes declare (sane_ray.cluster); None: the head
    cpus: int  # vCPUs of the instance
    memory_gib: int
    instance_type: str
    instance_profile: str  # the IAM role its nodes reach S3 (and, the head, EC2) with
    gpus: int = 0
    accelerator: str = ""  # the GPU model, e.g. "L40S 48 GB"
    min_workers: int = 0
    max_workers: int = 0
    kuberay_group: str = ""  # its workerGroupSpecs groupName in cluster/kuberay-*.yaml; "": the head group

    @property
    def is_head(self) -> bool:
        return self.marker is None

    def resources(self) -> dict[str, int]:
        """The ``resources`` of the type in a cloud config: the head takes no stage (0 CPUs); a
        worker declares its marker, and Ray reads its CPUs and GPUs from the instance."""
        return {"CPU": 0} if self.is_head else {self.marker: 1}

    def local_resources(self) -> dict[str, int]:
        """The type on one machine (module docstring): same marker, CPUs / LOCAL_SCALE, no GPUs."""
        if self.is_head:
            return {"CPU": 0}
        return {"CPU": math.ceil(self.cpus / LOCAL_SCALE), self.marker: 1,
                "object_store_memory": LOCAL_NODE_STORE_BYTES}

    def local_max_workers(self) -> int:
        return math.ceil(self.max_workers / LOCAL_SCALE)


NODE_TYPES: tuple[NodeType, ...] = (
    NodeType("head", "schedules and drives jobs; no stage runs here", None, cpus=8, memory_gib=32,
             instance_type="m6i.2xlarge", instance_profile="sane-ray-head"),
    NodeType("cpu_worker", "Ray Data: load, align, standardize, tokenize; draw windows every epoch", CPU_NODE,
             cpus=32, memory_gib=64, instance_type="c6i.8xlarge", instance_profile="sane-ray-worker",
             max_workers=16, kuberay_group="cpu"),
    NodeType("gpu_worker", "Ray Train: one FSDP2 rank per GPU", GPU_NODE, cpus=48, memory_gib=384,
             instance_type="g6e.12xlarge", instance_profile="sane-ray-worker", gpus=4, accelerator="L40S 48 GB",
             max_workers=4, kuberay_group="gpu"),
)
HEAD = next(t for t in NODE_TYPES if t.is_head)
WORKERS = tuple(t for t in NODE_TYPES if not t.is_head)


def aws_node_config(t: NodeType) -> dict[str, Any]:
    """The EC2 launch parameters of a node type."""
    return {"InstanceType": t.instance_type, "ImageId": AMI, "IamInstanceProfile": {"Name": t.instance_profile},
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": DISK_GIB, "VolumeType": "gp3"}}]}


def aws_node_types() -> dict[str, dict[str, Any]]:
    """``available_node_types`` of cluster/aws.yaml, as YAML reads it."""
    return {t.name: {"resources": t.resources(), "min_workers": t.min_workers, "max_workers": t.max_workers,
                     "node_config": aws_node_config(t)} for t in NODE_TYPES}


def fake_cluster_config(gcs_address: str, idle_timeout_minutes: float = 0.2) -> dict[str, Any]:
    """A complete autoscaler config for Ray's fake multi-node provider: ``RAY_FAKE_CLUSTER=1 ray start
    --head --port=PORT --num-cpus=0 --autoscaling-config=FILE`` on this machine, ``gcs_address`` its
    ``IP:PORT``. Worker nodes are extra raylets that the autoscaler starts and stops.

    ``ray start`` hands the file to the autoscaler unprepared (no provider defaults are merged, and
    Ray 2.60's wheel lacks the fake provider's defaults file), so every field it reads is here. The
    provider names its head "ray.head.default" and tags its nodes itself: node updaters (which would
    retag them) and launch-config checks are off. Its nodes share one IP, which the autoscaler
    would take for one node (and never find idle): ``use_node_id_as_ip`` keys them by node id.
    """
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    types: dict[str, dict[str, Any]] = {
        FAKE_HEAD_NODE_TYPE: {"resources": HEAD.local_resources(), "node_config": {}, "min_workers": 0,
                              "max_workers": 0}}
    for t in WORKERS:
        types[t.name] = {"resources": t.local_resources(), "node_config": {}, "min_workers": t.min_workers,
                         "max_workers": t.local_max_workers()}
    empty: dict[str, Any] = {k: [] for k in (
        "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
        "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    return {
        "cluster_name": "sane-ray-local",
        "max_workers": sum(t.local_max_workers() for t in WORKERS),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **empty,
    }
