"""One line per fault on the console; Ray's own output in the run's log file.

Ray streams every worker's and actor's output to the driver's console, so one dead Train
worker floods it with about 30 lines of controller tracebacks per restart. While a run
trains, :class:`RunConsole` takes that stream over on the driver: every line goes to the
run's log file (``<run dir>/logs/ray-<start time>.log``; on S3 it is written locally and
copied there when the run ends), and the console gets only what sane-ray writes for
people: the Train workers' stdout (progress, what a resume continues from) and the lines
marked with :data:`MARK`, the fault lines of :class:`FaultReporter`. Nothing from stderr,
the Train controller or the raylet reaches the console (the autoscaler's cluster events
still do).

:class:`FaultReporter` runs in the Train controller (a Ray Train callback) and writes one
line per failure: which rank's process died, on which node, and what happens next
("restarting from the newest checkpoint, restart 1 of 3"; rank 0 then says which epoch
it resumes after). The cause of a run that gives up ends
:class:`~sane_ray.train.trainer.PretrainingFailedError`'s first line
(:func:`describe_failure`).

The takeover replaces ``ray._private.worker.print_worker_logs``, the function both of
Ray's paths to the console (worker logs and raylet error messages) end in: Ray has no
public hook for it (``ray==2.60.0`` is pinned; ``tests/test_faults.py`` covers it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any, TextIO

from ray.train.v2.api.callback import UserCallback

from sane_ray import storage

log = logging.getLogger(__name__)

MARK = "[sane-ray] "
LOG_DIR = "logs"
_TRAIN_CONTROLLER = "TrainController"
_DEATH_DETAIL = re.compile(r"^\s*(pid|ip): (\S+)\s*$", re.MULTILINE)


def describe_failure(rank: int, error: BaseException) -> str:
    """``rank 1: its process (pid 4242) died on node 10.0.0.5``, or ``rank 0: RuntimeError: boom``."""
    died = _process_death(error)
    if died is not None:
        detail = dict(_DEATH_DETAIL.findall(str(died)))
        pid = f" (pid {detail['pid']})" if "pid" in detail else ""
        node = f" on node {detail['ip']}" if "ip" in detail else ""
        return f"rank {rank}: its process{pid} died{node}"
    if type(error).__name__ == "WorkerHealthCheckTimeoutError":
        return f"rank {rank}: its process stopped answering Ray's health checks"
    cause: BaseException = getattr(error, "cause", None) or error  # a RayTaskError wraps the user's exception
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"rank {rank}: {type(cause).__name__}: {text}"


def _process_death(error: BaseException) -> BaseException | None:
    """The ``ActorDiedError`` behind a failed worker health check (Ray's sign that the process is gone)."""
    from ray.exceptions import ActorDiedError

    seen = error
    for _ in range(3):
        if isinstance(seen, ActorDiedError):
            return seen
        seen = getattr(seen, "health_check_failure", None) or getattr(seen, "cause", None)
        if seen is None:
            return None
    return None


def root_failure(errors: dict[int, BaseException]) -> int:
    """The rank whose error explains the others: a dead process first (its peers then fail in collectives), else the lowest."""
    dead = [r for r in sorted(errors) if _process_death(errors[r]) is not None]
    return (dead or sorted(errors))[0]


class FaultReporter(UserCallback):
    """In the Train controller: one :data:`MARK` line per worker-group failure, saying what happens next.

    The epoch a restart continues from is rank 0's to say (:func:`sane_ray.train.resume.restore`
    prints it next): a worker may have uploaded a checkpoint the controller never heard of.
    """

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.failures = 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        rank = root_failure(worker_exceptions)
        if self.failures <= self.max_failures:
            then = f"restarting from the newest checkpoint, restart {self.failures} of {self.max_failures}"
        else:
            then = f"no restarts left (train.max_failures={self.max_failures})"
        sys.stdout.write(f"{MARK}{describe_failure(rank, worker_exceptions[rank])}; {then}\n")
        sys.stdout.flush()


class RunConsole:
    """On the driver, while a run trains: Ray's stream into the run's log file, the console only what is for people."""

    def __init__(self, run_uri: str, s3: storage.S3Options | None = None, quiet_s: float = 1.0, drain_s: float = 5.0):
        self.s3 = s3
        self.quiet_s, self.drain_s = quiet_s, drain_s
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
        self.uri = storage.join(run_uri, LOG_DIR, f"ray-{stamp}.log")
        loc = storage.parse_uri(self.uri, s3)
        self._staging = None if loc.scheme == "file" else tempfile.mkdtemp(prefix="sane-run-log-")
        if self._staging is None:
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            self.path = loc.path
        else:
            self.path = os.path.join(self._staging, os.path.basename(loc.path))
        self._file: TextIO | None = None
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._original: Any = None

    def __enter__(self) -> "RunConsole":
        from ray._private import worker as ray_worker

        self._file = open(self.path, "a", encoding="utf-8")
        self._original = ray_worker.print_worker_logs
        ray_worker.print_worker_logs = self._print
        return self

    def __exit__(self, *exc: object) -> None:
        from ray._private import worker as ray_worker

        deadline = time.monotonic() + self.drain_s  # lines still on their way from the cluster
        while time.monotonic() < deadline and time.monotonic() - self._last < self.quiet_s:
            time.sleep(0.1)
        ray_worker.print_worker_logs = self._original
        with self._lock:
            assert self._file is not None
            self._file.close()
        if self._staging is not None:
            try:
                with open(self.path, "rb") as f:
                    storage.write_bytes_atomic(self.uri, f.read(), self.s3)
            except storage.StorageError as e:  # the run's own outcome matters more than its log
                log.warning("%s; the run's log stays at %s", e, self.path)
                return
            shutil.rmtree(self._staging, ignore_errors=True)

    def _print(self, data: dict[str, Any], print_file: Any, ignore_prefix: bool = False) -> None:
        """Ray's ``print_worker_logs``: every line to the file, the lines meant for people to the console."""
        if data.get("pid") == "autoscaler":  # cluster events (nodes added, infeasible demands): as before
            self._original(data, print_file, ignore_prefix)
            return
        self._last = time.monotonic()
        lines = list(data.get("lines", []))
        source = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({source + ' ' if source else ''}pid={data.get('pid')}, ip={data.get('ip', '?')}) "
        with self._lock:
            if self._file is not None and not self._file.closed:
                self._file.writelines(f"{prefix}{line}\n" for line in lines)
                self._file.flush()
        marked = [line[line.index(MARK) + len(MARK):] for line in lines if MARK in line]
        for line in marked:
            sys.stdout.write(f"sane-ray: {line}\n")
        if marked:
            sys.stdout.flush()
        wanted = [line for line in lines if MARK not in line]
        if wanted and not data.get("is_err") and data.get("pid") != "raylet" and source != _TRAIN_CONTROLLER:
            self._original({**data, "lines": wanted}, print_file, ignore_prefix)
