"""The main job on a multi-node cluster on one machine: stages land on their node types, and
training survives losing a node.

``ray.cluster_utils.Cluster`` starts a CPU-type head (``sane_cpu_node``) and two GPU-type
nodes (CPU-only nodes carrying ``sane_gpu_node``, so the Train workers ask for CPUs only). The cluster runs in a separate process (this file run
as a script) so it never meets the test session's own Ray cluster. The script pretrains
on a zoo in the session's S3 endpoint with ``run.node_types=true``; after the first
checkpoint is registered it removes the node running the Train workers, and the run must
resume from that checkpoint on the other GPU-type node and finish. It then writes what
Ray's state API says about every actor and task, which the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

EPOCHS = 3
HOLD_AFTER_EPOCH = 1  # the workers wait here until their node is removed
MARKER_FILE = "held"
TIMEOUT_S = 600  # generous: a shared, loaded 2-core machine is many times slower than an idle one


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_stages_run_on_their_node_types_and_training_survives_a_lost_node(s3, tmp_path):
    import zoo_builders as zb

    from sane_ray import storage

    zoo, out = f"s3://{s3['bucket']}/zoo", f"s3://{s3['bucket']}/runs"
    zb.build_native_zoo(zoo, n_models=8, epochs=2)
    report = tmp_path / "report.json"
    # A private Ray temp dir (short: socket paths are limited) holds the cluster's sessions and
    # its address file, so no other `ray.init()` on this machine connects to it by mistake.
    ray_tmp = tempfile.mkdtemp(prefix="sane-mn-", dir="/tmp")
    # No RAY_API_SERVER_ADDRESS either: the session cluster's (tests/conftest.py) is not this one.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_API_SERVER_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, __file__, zoo, out, str(tmp_path), str(report)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the nodes it started, nothing else
        log, _ = proc.communicate()
        pytest.fail(f"the multi-node run took over {TIMEOUT_S} s:\n{log[-6000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, log[-6000:]
    r = json.loads(report.read_text())
    kind = r["node_kind"]

    def kinds(entries: list[dict], match: str) -> set[str]:
        found = [e for e in entries if match in e["name"]]
        assert found, f"no {match!r} among {sorted({e['name'] for e in entries})}"
        return {kind.get(e["node_id"], "unknown") for e in found}

    assert kinds(r["actors"], "Canonicalizer") == {"cpu"}  # preprocessing actor pool
    assert kinds(r["tasks"], "_model_stats") == {"cpu"}  # statistics pass
    assert kinds(r["tasks"], "read_and_draw") == {"cpu"}  # window drawing, every epoch
    assert kinds(r["actors"], "RayTrainWorker") == {"gpu"}
    # Both worker groups ran on GPU-type nodes: the first on the removed node, the second elsewhere.
    workers = [a for a in r["actors"] if "RayTrainWorker" in a["name"]]
    assert {a["node_id"] for a in workers if a["node_id"] == r["removed_node"]}
    assert {a["node_id"] for a in workers} - {r["removed_node"]}

    history = r["history"]
    assert [h["epoch"] for h in history] == [float(e) for e in range(1, EPOCHS + 1)]
    # Epochs after the loss ran in a new worker group that resumed from the held epoch's checkpoint.
    assert [h["resumed_from_epoch"] for h in history] == [0.0] * HOLD_AFTER_EPOCH + [float(HOLD_AFTER_EPOCH)] * (
        EPOCHS - HOLD_AFTER_EPOCH)
    assert {"model.safetensors", "summary.md"} <= set(storage.listdir(storage.join(out, "multinode")))


# ---------------------------------------------------------------- the script (its own process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hold(rank: int, epoch: int, flag_dir: str) -> None:
    """On every worker after an epoch: after the held epoch, wait (for the node to be removed)."""
    if epoch == HOLD_AFTER_EPOCH:
        Path(flag_dir, f"{MARKER_FILE}-{rank}").touch()
        time.sleep(120)


def _remove_train_node_when_held(
    cluster, run_uri: str, flag_dir: str, removed: list[str], done: threading.Event
) -> None:
    """Once both workers wait after the held epoch and its checkpoint is registered, remove their node."""
    from ray.util.state import list_actors

    from sane_ray import storage

    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")  # Ray Train's registered checkpoints
    while not done.is_set():
        held = len(list(Path(flag_dir).glob(f"{MARKER_FILE}-*")))
        if held == 2 and storage.exists(snapshot):
            break
        time.sleep(0.5)
    else:
        return
    alive = list_actors(address=cluster.address,
                        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    node_id = alive[0].node_id
    removed.append(node_id)
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)


def main(zoo: str, out: str, flag_dir: str, report: str) -> None:
    import functools

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from sane_ray import storage
    from sane_ray.config import load_config
    from sane_ray.cluster import CPU_NODE, GPU_NODE
    from sane_ray.pretrain import run_pretrain
    from sane_ray.pretrain_config import PretrainConfig, preset_config

    # Three nodes keep start-up affordable on 2 cores: the head is the CPU-type node (one CPU,
    # so stages that ignored placement would spill onto the GPU-type nodes' free CPUs).
    store = 100 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {CPU_NODE: 1}, "object_store_memory": store,
        "include_dashboard": True, "dashboard_port": _free_port()})
    try:
        node_kind = {cluster.head_node.node_id: "cpu"}
        for _ in range(2):
            node = cluster.add_node(num_cpus=2, resources={GPU_NODE: 1}, object_store_memory=store)
            node_kind[node.node_id] = "gpu"
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)

        cfg = load_config(PretrainConfig, overrides=[
            f"data.zoo_uri={zoo}", f"run.out={out}", "run.name=multinode", "run.node_types=true", "run.workers=2",
            "run.cpus_per_worker=1",  # both workers fit the GPU-type node that is left
            f"train.epochs={EPOCHS}", "train.batch_size=4", "train.num_threads=1", "train.max_failures=1",
            "data.num_actors=2",
        ], base=preset_config("tiny"))
        removed: list[str] = []
        done = threading.Event()
        watcher = threading.Thread(
            target=_remove_train_node_when_held,
            args=(cluster, storage.join(out, "multinode"), flag_dir, removed, done), daemon=True)
        watcher.start()
        try:
            result = run_pretrain(cfg, on_epoch_end=functools.partial(_hold, flag_dir=flag_dir))
        finally:
            done.set()
        watcher.join(timeout=5)
        state = {"address": cluster.address, "limit": 10_000, "raise_on_missing_output": False}
        # Actors and tasks that ran somewhere (an actor the pool requested but never placed has no node).
        actors = [{"name": a.class_name, "node_id": a.node_id} for a in list_actors(**state) if a.node_id]
        tasks = [{"name": t.name, "node_id": t.node_id} for t in list_tasks(**state) if t.node_id]
        Path(report).write_text(json.dumps({
            "node_kind": node_kind, "actors": actors, "tasks": tasks,
            "removed_node": removed[0] if removed else None, "history": result.return_value,
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
