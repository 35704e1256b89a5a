"""Ray's autoscaler grows and shrinks a cluster for a pretraining run (issue 22): the node types of
cluster/ exercised, not only described.

The cluster is Ray's own local autoscaling cluster: ``RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=FILE`` with the fake multi-node provider, whose worker nodes are extra raylets
on this machine that the autoscaler starts and stops. FILE is
:func:`sane_ray.cluster_types.fake_cluster_config`, the node types of cluster/aws.yaml scaled down
to one machine; the head runs no stage and no worker node exists at the start. The released CLI
then pretrains on a tiny zoo with ``run.node_types`` and ``run.autoscaling`` on (CPU training: the
GPU type is a CPU node that declares ``sane_gpu_node``). The canonical build and the window
stream ask for ``sane_cpu_node``, the Train worker for ``sane_gpu_node``: the autoscaler must add a
node of each type, the job must finish, and the idle nodes must be removed afterwards. The
evidence is the autoscaler's own log (``monitor.log`` of the head's session), printed by the test.

Heavy (several raylets on a 2-core machine), so deselected by default:
``pytest -m autoscaling tests/test_autoscaling.py -s``. The head has a private temp dir and ports,
and it is torn down by killing its own process group (never ``ray stop``, which would stop every
Ray cluster on the machine): the fake nodes are started by its autoscaler, in the same group.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sane_ray.cluster import free_port
from sane_ray.cluster_types import HEAD, LOCAL_NODE_STORE_BYTES, WORKERS, fake_cluster_config

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
IDLE_TIMEOUT_MINUTES = 0.2
JOB_TIMEOUT_S = 720
REMOVAL_TIMEOUT_S = 180  # the idle timeout, then the autoscaler's next passes, on a loaded machine
PRETRAIN = ["--preset", "tiny", "--workers", "1", "--epochs", "1", "--batch-size", "4", "--train.num_threads", "1",
            "--node-types", "true", "--run.autoscaling", "true"]
# The autoscaler's summary of each update, e.g. "Adding 1 node(s) of type cpu_worker." or
# "Removing 1 nodes of type cpu_worker (idle)." (ray/autoscaler/_private/{node_launcher,autoscaler}.py).
EVENT = re.compile(r":event_summary:(Adding|Removing) \d+ nodes?(?:\(s\))? of type (\w+)(?: \(([^)]*)\))?\.$")

pytestmark = [pytest.mark.autoscaling, pytest.mark.timeout(JOB_TIMEOUT_S + REMOVAL_TIMEOUT_S + 300)]


class FakeCluster:
    """A fake multi-node head with its autoscaler: this test's temp dir and ports, its own process group."""

    def __init__(self, tmp: str):
        import ray.util

        self.tmp = tmp  # short: Ray's socket paths are limited
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"{ray.util.get_node_ip_address()}:{self.port}"
        self.config = Path(tmp, "autoscaling.yaml")
        self.config.write_text(yaml.safe_dump(fake_cluster_config(self.address, IDLE_TIMEOUT_MINUTES)))
        # Every process of the cluster inherits this: the fake provider's switch, a fast autoscaler
        # loop, this checkout's package on the workers, the State API of this cluster (Train V2 asks it).
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_ADDRESS": "", "RAY_TMPDIR": tmp, "SANE_RAY_CACHE": f"{tmp}/cache",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                    "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}"}
        self.pgid: int | None = None

    def start(self) -> None:
        ports = {"port": self.port, "dashboard-port": self.dashboard, "ray-client-server-port": free_port(),
                 "node-manager-port": free_port(), "object-manager-port": free_port(),
                 "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
                 "metrics-export-port": free_port(), "runtime-env-agent-port": free_port(),
                 "min-worker-port": 0, "max-worker-port": 0}  # 0: random worker ports
        cmd = [RAY, "start", "--head", f"--temp-dir={self.tmp}", f"--autoscaling-config={self.config}",
               f"--num-cpus={HEAD.local_resources()['CPU']}", f"--object-store-memory={LOCAL_NODE_STORE_BYTES}",
               "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
        with open(Path(self.tmp, "head.log"), "w") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.pgid = proc.pid  # the daemons `ray start` leaves behind stay in its group
            rc = proc.wait(timeout=300)
        assert rc == 0, Path(self.tmp, "head.log").read_text()[-4000:]

    def monitor_log(self) -> str:
        path = Path(self.tmp, "session_latest", "logs", "monitor.log")
        return path.read_text() if path.exists() else ""

    def events(self) -> list[tuple[str, str, str]]:
        """The autoscaler's node events, in order: (Adding|Removing, node type, reason or "")."""
        found = []
        for line in self.monitor_log().splitlines():
            m = EVENT.search(line)
            if m:
                found.append((m[1], m[2], m[3] or ""))
        return found

    def event_lines(self) -> list[str]:
        return [line for line in self.monitor_log().splitlines() if EVENT.search(line)]

    def processes(self) -> dict[int, str]:
        """Every live process of this cluster, pid -> command line: its group, and anything naming its temp dir."""
        found = {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                stat = (proc / "stat").read_text()
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # exited meanwhile
                continue
            state, _, pgid = stat.rsplit(")", 1)[1].split()[:3]  # after "pid (name)": state ppid pgrp
            if state != "Z" and (int(pgid) == self.pgid or self.tmp in cmdline):
                found[int(proc.name)] = cmdline
        return found

    def raylets(self) -> int:
        return sum("/raylet/raylet " in cmd for cmd in self.processes().values())

    def stop(self) -> None:
        """Kill this cluster's processes (its group: head daemons, fake nodes, their workers), nothing else."""
        if self.pgid is None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.processes():
                time.sleep(0.5)
        for pid in self.processes():  # outside the group but naming its temp dir: still ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_for(what: str, done, timeout: float, log: FakeCluster) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s; autoscaler events:\n" + "\n".join(log.event_lines()))
        time.sleep(2)


def run_job(cluster: FakeCluster, zoo: str, out: str) -> tuple[int, str]:
    """The released CLI, attached to the cluster by RAY_ADDRESS as a user's shell would be."""
    cmd = [sys.executable, "-m", "sane_ray.cli", "pretrain", "--zoo", zoo, "--out", out, "--name", "auto", *PRETRAIN]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    del env["RAY_FAKE_CLUSTER"]  # the driver is no node
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the pretraining job took over {JOB_TIMEOUT_S} s:\n{log[-6000:]}")
    return proc.returncode, log


def test_the_autoscaler_adds_each_node_type_for_a_pretraining_run_and_removes_them_idle(tmp_path):
    import zoo_builders as zb

    zoo = str(tmp_path / "zoo")
    zb.build_native_zoo(zoo, n_models=8, epochs=2)
    cluster = FakeCluster(tempfile.mkdtemp(prefix="ra-", dir="/tmp"))
    started = time.monotonic()
    try:
        cluster.start()
        assert cluster.raylets() == 1 and cluster.events() == []  # the head alone: zero workers
        rc, log = run_job(cluster, zoo, str(tmp_path / "runs"))
        job_s = time.monotonic() - started
        assert rc == 0, log[-6000:]
        assert "autoscaling cluster" in log  # the job planned for a cluster that grows

        types = [t.name for t in WORKERS]
        added = {t for verb, t, _ in cluster.events() if verb == "Adding"}
        assert added == set(types), cluster.event_lines()

        def all_removed_idle() -> bool:
            return {t for verb, t, why in cluster.events() if verb == "Removing" and why == "idle"} == set(types)

        wait_for("the idle nodes were not removed", all_removed_idle, REMOVAL_TIMEOUT_S, cluster)
        wait_for("the removed nodes' raylets did not exit", lambda: cluster.raylets() == 1, 60, cluster)
        assert not [e for e in cluster.events() if e[0] == "Removing" and e[2] != "idle"], cluster.event_lines()
        print(f"\njob finished after {job_s:.0f} s, nodes removed after {time.monotonic() - started:.0f} s; "
              "the autoscaler's events (monitor.log):")
        print("\n".join(cluster.event_lines()))
    finally:
        cluster.stop()
        left = cluster.processes()
        logs = Path(cluster.tmp, "session_latest", "logs")
        if logs.exists():  # kept under pytest's tmp_path, for a person reading a failure
            shutil.copytree(logs, tmp_path / "ray-logs", ignore=shutil.ignore_patterns("*.sock"), symlinks=True)
        shutil.rmtree(cluster.tmp, ignore_errors=True)
    assert not left, left
