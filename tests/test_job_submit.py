"""Every job of `jobs/` submitted exactly as README.md documents it (issue 25).

A head node is started the way a user starts one, `ray start --head` at this machine's default
resources (only its ports and temp dir are private, so it never meets another Ray cluster on
the machine), and each job goes in with `ray job submit --working-dir .` and no flags beyond a
small zoo and few epochs: make-zoo writes the zoo the others use, pretrain sizes itself to the
cluster, probe and sample read its run. The submitted
pretraining run gives the same losses and the same console as `python jobs/pretrain.py` on the
local cluster sane-ray starts for itself.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest

from sane_ray import storage
from sane_ray.cluster import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
ZOO = ["--models", "8", "--epochs", "2"]
EPOCHS = ["--epochs", "1"]

pytestmark = pytest.mark.timeout(900)


class Head:
    """A `ray start --head` node this module started: its job server address and the environment to reach it."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        port, self.dashboard = free_port(), free_port()
        # The State API of this cluster (Tune's ASHA needs it; with several clusters on the machine
        # Ray cannot find it alone). The job's processes inherit it from the node.
        self.env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": tmp, "SANE_RAY_CACHE": f"{tmp}/cache",
                    "PYTHONUNBUFFERED": "1",  # head.log complete at any moment (it says why a node went away)
                    "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}"}
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.log = open(f"{tmp}/head.log", "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={self.dashboard}",
             f"--temp-dir={tmp}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> None:
        """Until the job server takes jobs: it refuses them until the node's dashboard agent has registered."""
        # Ray's clients take RAY_API_SERVER_ADDRESS over the address they are given, and this
        # process may hold the test session's cluster there (tests/conftest.py): point it here.
        with mock.patch.dict(os.environ, {"RAY_API_SERVER_ADDRESS": self.address}):
            self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        from ray.job_submission import JobStatus, JobSubmissionClient

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited: {Path(self.tmp, 'head.log').read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(self.address)
                job = client.submit_job(entrypoint="true")
                break
            except (OSError, RuntimeError) as e:  # not up yet (requests errors are OSErrors), or no agent yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the job server at {self.address} did not start: {e}") from e
                time.sleep(1)
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the no-op job on {self.address} did not finish in time")
            time.sleep(0.5)

    def diagnosis(self) -> str:
        """What a failed test prints about the node: alive or not, its console, and its dashboard's log."""
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        parts = [f"\n--- ray start --head: {state}; head.log ---\n" + Path(self.tmp, "head.log").read_text(errors="replace")[-3000:]]
        for name in ("dashboard.log", "dashboard.err", "monitor.log", "raylet.out", "raylet.err", "gcs_server.out",
                     "gcs_server.err"):
            for path in Path(self.tmp).glob(f"session_*/logs/{name}"):
                if path.parent.parent.is_symlink():
                    continue
                parts.append(f"\n--- {path.relative_to(self.tmp)} ---\n" + path.read_text(errors="replace")[-2000:])
        return "".join(parts)

    def stop(self) -> None:
        """Stop the node and everything it started (its processes name its temp dir), nothing else."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block shuts its node down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        deadline = time.monotonic() + 30  # its workers exit on their own once the raylet is gone
        while processes_naming(self.tmp) and time.monotonic() < deadline:
            time.sleep(1)
        kill_processes_naming(self.tmp)


def processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line names ``text`` (a private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:  # gone already
                pass
    return pids


def kill_processes_naming(text: str) -> None:
    for pid in processes_naming(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def head():
    tmp = tempfile.mkdtemp(prefix="sane-js-", dir="/tmp")  # short: Ray's socket paths are limited
    node = Head(tmp)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not processes_naming(tmp), "processes of the head node outlived it"


def submit(head: Head, *job: str, timeout: float = 420) -> str:
    """`ray job submit --working-dir . -- python JOB...` from the checkout, as README.md has it; returns the log."""
    cmd = [RAY, "job", "submit", "--address", head.address, "--working-dir", ".", "--", "python", *job]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=head.env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in log, log[-6000:] + head.diagnosis()
    return log


def job_logs(head: Head, submitted: str) -> str:
    """`ray job logs` of the job whose `ray job submit` output is ``submitted``."""
    job = re.search(r"Job '(raysubmit_\w+)' submitted", submitted)[1]
    proc = subprocess.run([RAY, "job", "logs", "--address", head.address, job], capture_output=True, text=True,
                          timeout=60, env=head.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# Ray's line on how the driver found its cluster (attached to RAY_ADDRESS, or a new local one), and the
# `ray job submit` client's own lines around the job's.
HOW_RAY_STARTED = re.compile(
    r"worker\.py:\d+ -- (Using address|Connecting to existing|Connected to Ray cluster|Started a local Ray)"
    r"| cli\.py:\d+ -- ")


def console(log: str) -> list[str]:
    """A job's console lines, sorted (workers' lines interleave freely), without what differs between two runs
    of one config: times, numbers, paths, ids, and how the driver found its cluster."""
    start = log.find("Running entrypoint for job")
    if start >= 0:
        log = log[log.index("\n", start) + 1:]
    lines = []
    for line in log.splitlines():
        if HOW_RAY_STARTED.search(line):
            continue
        line = re.sub(r"\x1b\[[\d;]*m|\d{4}-\d\d-\d\d[ T][\d:,.]+|pid=\d+|ip=[\d.]+", "", line)
        line = re.sub(r"(/[\w.\-]+)+|\b[0-9a-f]{8,}\b|\b\w*\d[\w.]*", "#", line).strip()
        if line:
            lines.append(line)
    return sorted(lines)


def plan_lines(log: str) -> list[str]:
    """The plan the pretraining job printed (sane_ray.cluster.Plan.line)."""
    return re.findall(r"sane_ray\.pretrain: (\d+ CPUs.*: .*Train worker.*)$", log, flags=re.M)


def losses(run: str) -> list[dict[str, str]]:
    rows = csv.DictReader(io.StringIO(storage.read_bytes(storage.join(run, "metrics.csv")).decode()))
    return [{k: v for k, v in r.items() if "loss" in k or k == "epoch"} for r in rows]


@pytest.fixture(scope="module")
def work(head):
    """The zoo (written by the submitted make-zoo job) and the runs directory, shared by the tests below."""
    root = Path(head.tmp) / "work"
    log = submit(head, "jobs/make_zoo.py", "--out", str(root / "zoo"), *ZOO)
    assert "zoo written to" in log and re.search(r"\d+ CPUs: 8 model-training tasks, up to \d+ at once x 1 CPU", log)
    return root


@pytest.fixture(scope="module")
def submitted_run(head, work):
    log = submit(head, "jobs/pretrain.py", "--zoo", str(work / "zoo"), "--out", str(work / "runs"),
                 "--name", "submitted", *EPOCHS)
    return str(work / "runs" / "submitted"), log


def test_pretrain_sizes_itself_to_the_cluster_it_joins(head, work, submitted_run):
    """No worker count given: one plan line for this cluster, the run written, and the same losses and console
    as the local cluster sane-ray starts for itself (both are at Ray's default size for this machine)."""
    run, log = submitted_run
    assert "Connecting to existing Ray cluster" in log and "SANE pretraining finished" in log, log[-4000:]
    plan = plan_lines(log)
    assert len(plan) == 1 and re.fullmatch(
        r"\d+ CPUs: \d+ Train workers? x \d+ threads? \([\d.]+ CPU( each)?\), stream 0.5 CPU", plan[0]), log[-4000:]
    assert {"model.safetensors", "sane_config.json", "summary.md", "metrics.csv"} <= set(storage.listdir(run))

    local_tmp = tempfile.mkdtemp(prefix="sane-jl-", dir="/tmp")
    env = {**head.env, "RAY_TMPDIR": local_tmp, "RAY_API_SERVER_ADDRESS": ""}
    shutil.copytree(work / "zoo", work / "zoo-copy")  # its own canonical cache: built here too, not reused
    try:
        for _ in range(2):  # Ray gives a new node 30 s to register (hard-coded): a loaded machine can miss that once
            local = subprocess.run(
                [sys.executable, "jobs/pretrain.py", "--zoo", str(work / "zoo-copy"), "--out", str(work / "runs"),
                 "--name", "local", *EPOCHS], cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
            if "timed out during startup" not in local.stderr:
                break
    finally:
        kill_processes_naming(local_tmp)
        shutil.rmtree(local_tmp, ignore_errors=True)
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    assert losses(str(work / "runs" / "local")) == losses(run)
    assert plan_lines(local.stdout + local.stderr) == plan
    assert console(local.stdout + local.stderr) == console(job_logs(head, log))


def test_probe_and_sample_jobs_read_the_submitted_run(head, work, submitted_run):
    run, _ = submitted_run
    log = submit(head, "jobs/probe.py", "--run", run, "--folds", "3")
    assert "probe results written to" in log
    assert storage.exists(storage.join(run, "probe", "results.md"))
    log = submit(head, "jobs/sample.py", "--run", run, "--task", "digits", "--candidates", "4", "--keep", "2")
    assert "sampling finished" in log and re.search(r"\d+ CPUs: 1 sampling tasks?, up to 1 at once x 1 CPU", log)
    assert storage.exists(storage.join(run, "sample", "candidates.csv"))
