"""The cluster files in cluster/: Ray's autoscaler schema accepts the AWS file, the KubeRay
manifests carry what KubeRay needs, every node type declares the placement resource that
sane_ray.cluster asks for, the node types of every file follow sane_ray.cluster_types, and the
commands they run parse with the real CLI."""

from __future__ import annotations

import copy
import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from sane_ray.cli import build_parser
from sane_ray.config import load_config, overrides_from_args
from sane_ray.cluster import CPU_NODE, GPU_NODE, MARKER, check_node_types, remote_args, worker_resources
from sane_ray.cluster_types import HEAD, LOCAL_SCALE, WORKERS, aws_node_types, fake_cluster_config
from sane_ray.pretrain_config import PretrainConfig, preset_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
sys.path.insert(0, str(REPO / "tools"))

import cluster_files  # noqa: E402


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def validate_aws(cfg: dict) -> None:
    """What `ray up` does first: fill in the provider's defaults, then check Ray's schema."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


# ---------------------------------------------------------------- AWS


def test_aws_file_validates_against_rays_autoscaler_schema():
    validate_aws(load("aws.yaml"))


def test_the_schema_check_can_fail():
    import jsonschema

    cfg = load("aws.yaml")
    cfg["available_node_types"]["cpu_worker"]["resources"][CPU_NODE] = MARKER  # the schema wants integers
    with pytest.raises(jsonschema.ValidationError):
        validate_aws(cfg)
    del cfg["available_node_types"]["cpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError):
        validate_aws(cfg)


def test_aws_node_types():
    cfg = load("aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0  # runs no stage, no GPU
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    by_resource = {r: name for name, t in workers.items() for r in t["resources"]}
    assert set(by_resource) == {CPU_NODE, GPU_NODE}
    for t in workers.values():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1  # scale from zero
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"]  # S3 by instance role, no keys on nodes
    # The checkout is copied to every node and installed there.
    assert cfg["file_mounts"] == {"~/sane-ray": "."}
    assert any("pip install" in c and "-e ~/sane-ray" in c for c in cfg["setup_commands"])


def test_aws_node_types_are_rendered_from_the_one_source():
    text = (CLUSTER / "aws.yaml").read_text()
    assert cluster_files.render_aws(text) == text, "run: python tools/cluster_files.py"
    cfg = yaml.safe_load(text)
    assert cfg["available_node_types"] == aws_node_types() and cfg["head_node_type"] == HEAD.name
    assert sum(t.max_workers for t in WORKERS) <= cfg["max_workers"]


def test_the_render_check_can_fail():
    text = (CLUSTER / "aws.yaml").read_text()
    drifted = text.replace("max_workers: 16", "max_workers: 15", 1)
    assert drifted != text and cluster_files.render_aws(drifted) == text
    with pytest.raises(ValueError, match="available_node_types"):
        cluster_files.render_aws(text.replace("available_node_types:", "node_types:"))


def test_the_local_cluster_is_the_same_node_types_scaled_to_one_machine():
    from ray.autoscaler._private.util import validate_config

    cfg = fake_cluster_config("127.0.0.1:6379")
    validate_config(cfg)  # Ray's autoscaler schema
    types = cfg["available_node_types"]
    assert types.pop(cfg["head_node_type"])["resources"] == HEAD.resources() == {"CPU": 0}
    assert list(types) == [t.name for t in WORKERS]
    for t in WORKERS:
        local = types[t.name]
        assert local["resources"][t.marker] == t.resources()[t.marker] == 1  # same placement resource
        assert local["resources"]["CPU"] == math.ceil(t.cpus / LOCAL_SCALE) and "GPU" not in local["resources"]
        assert local["min_workers"] == 0 and 1 <= local["max_workers"] <= t.max_workers
    small, large = sorted(WORKERS, key=lambda t: t.cpus)
    assert types[small.name]["resources"]["CPU"] <= types[large.name]["resources"]["CPU"]  # order of size kept


# ---------------------------------------------------------------- KubeRay


def start_param_resources(group: dict) -> dict[str, float]:
    """Custom resources from KubeRay's rayStartParams (a JSON object inside a quoted string)."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    groups = [head, *spec["workerGroupSpecs"]]
    for g in groups:  # KubeRay's rayStartParams is map[string]string
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c.get("name") and c.get("image") for c in containers)
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    by_resource = {}
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] == 0 and g["maxReplicas"] >= 1
        (name, amount), = start_param_resources(g).items()
        assert amount >= 1
        by_resource[name] = g
    assert set(by_resource) == {CPU_NODE, GPU_NODE}
    gpu_limits = by_resource[GPU_NODE]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu_limits = by_resource[CPU_NODE]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1 and "nvidia.com/gpu" not in cpu_limits


def test_kuberay_cluster_manifest():
    doc = load("kuberay-cluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"])


def memory_gib(quantity: str) -> float:
    """A Kubernetes memory quantity in GiB (the manifests write Gi)."""
    assert quantity.endswith("Gi"), quantity
    return float(quantity[:-2])


def test_kuberay_groups_follow_the_node_types():
    spec = load("kuberay-cluster.yaml")["spec"]
    assert float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]) == HEAD.resources()["CPU"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {t.kuberay_group for t in WORKERS}
    for t in WORKERS:
        g = groups[t.kuberay_group]
        assert (g["minReplicas"], g["maxReplicas"]) == (t.min_workers, t.max_workers)
        assert start_param_resources(g) == t.resources()
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits.get("nvidia.com/gpu", 0)) == t.gpus
        # A pod fits its instance (the rest is the node's own daemons').
        assert float(limits["cpu"]) <= t.cpus and memory_gib(limits["memory"]) <= t.memory_gib


def test_kuberay_job_manifest_runs_the_pretraining_job_on_the_same_cluster():
    doc = load("kuberay-job.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["rayClusterSpec"] == load("kuberay-cluster.yaml")["spec"]  # one cluster definition
    check_ray_cluster_spec(spec["rayClusterSpec"])

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "/app/jobs/pretrain.py"]  # where cluster/Dockerfile puts the code
    cfg = parse_pretrain(argv[2:], image_root="/app")
    assert cfg.data.zoo_uri.startswith("s3://") and cfg.run.out.startswith("s3://")
    assert cfg.run.node_types and cfg.run.autoscaling


def test_dockerfile_ships_what_the_job_runs():
    text = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "WORKDIR /app" in text
    for part in ("sane_ray", "jobs", "cluster"):
        assert f"COPY {part} ./{part}" in text


# ---------------------------------------------------------------- jobs and the runtime env


def parse_pretrain(args: list[str], image_root: str | None = None) -> PretrainConfig:
    """The config a ``jobs/pretrain.py`` command line builds (as sane_ray.cli does)."""
    if image_root:
        args = [a.replace(image_root + "/", str(REPO) + "/") for a in args]
    ns = build_parser().parse_args(["pretrain", *args])
    base = preset_config(ns.preset) if ns.preset else None
    return load_config(PretrainConfig, ns.config, overrides_from_args(ns), base=base)


def test_cluster_run_settings_place_stages_by_node_type():
    cfg = parse_pretrain(["--config", str(CLUSTER / "pretrain.yaml"), "--zoo", "s3://b/zoo"])
    assert cfg.run.node_types and cfg.run.autoscaling and cfg.run.gpus_per_worker == 1
    assert cfg.train.max_failures >= 1  # a lost node restarts the workers from the last checkpoint


def test_runtime_env_file_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = load("runtime-env.yaml")
    RuntimeEnv(**env)  # rejects unknown fields
    assert env["working_dir"] == "." and ".git" in env["excludes"]


def test_readme_cluster_commands_name_existing_files_and_parse():
    text = (REPO / "README.md").read_text()
    section = text.split("## Clusters", 1)[1].split("\n## ", 1)[0]
    for name in ("aws.yaml", "kuberay-cluster.yaml", "kuberay-job.yaml", "runtime-env.yaml", "pretrain.yaml"):
        assert f"cluster/{name}" in section and (CLUSTER / name).exists()
    commands = [line.split("-- ", 1)[1] for line in section.replace("\\\n", " ").splitlines()
                if "ray job submit" in line]
    assert commands
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "jobs/pretrain.py"]
        args = [str(REPO / a) if a.startswith("cluster/") else a for a in argv[2:]]
        assert parse_pretrain(args).run.node_types


# ---------------------------------------------------------------- placement arguments


def test_placement_arguments():
    assert remote_args("cpu", 2, node_types=False) == {"num_cpus": 2}
    assert remote_args("cpu", 1, node_types=True) == {"num_cpus": 1, "resources": {CPU_NODE: MARKER}}
    assert remote_args("gpu", 4, 1, node_types=True) == {"num_cpus": 4, "num_gpus": 1, "resources": {GPU_NODE: MARKER}}
    assert worker_resources(8, 1, node_types=False) == {"CPU": 8, "GPU": 1}
    assert worker_resources(1, node_types=True) == {"CPU": 1, GPU_NODE: MARKER}
    with pytest.raises(ValueError, match="node kind"):
        remote_args("tpu", 1, node_types=True)  # type: ignore[arg-type]


def test_typed_placement_on_a_cluster_without_node_types_fails_in_one_line(ray_cluster):
    check_node_types(False, autoscaling=False)  # one machine: nothing to check
    check_node_types(True, autoscaling=True)  # an autoscaler adds the nodes
    with pytest.raises(ValueError, match=f"{CPU_NODE} or {GPU_NODE}.*run.node_types=false"):
        check_node_types(True, autoscaling=False)
