"""Process-tree accounting from Linux /proc: memory (PSS, RSS), CPU seconds and bytes read.

Shared by the benchmarks that measure a whole Ray job (driver, GCS, raylet and every
worker are descendants of the process that called ``ray.init``). PSS counts a shared page
once over the tree, so the object store's pages (mapped by the raylet and the workers
that touch them) and torch's shared libraries are not counted once per process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

TICK = os.sysconf("SC_CLK_TCK")


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process on the machine."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    kids, stack, found = children(), [root], [root]
    while stack:
        for c in kids.get(stack.pop(), []):
            stack.append(c)
            found.append(c)
    return found


def kib(path: str, field: str) -> int:
    """A ``Field:  N kB`` value of a /proc status-like file (0 once the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def counters(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system), ``rchar`` (bytes of read calls) and ``read_bytes`` (from the device)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK
        io = {}
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, v = line.split(":")
                io[k] = int(v)
        return cpu, io.get("rchar", 0), io.get("read_bytes", 0)
    except (OSError, ValueError):
        return 0.0, 0, 0


def is_ray_worker(pid: int) -> bool:
    """A Ray task or actor process (its title starts with ``ray::``), not the GCS, raylet or driver."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().startswith(b"ray::")
    except OSError:
        return False


class TreeSampler:
    """Samples the tree under ``root`` every ``interval`` seconds, per phase (``phase()`` names the current one).

    Per phase: peak PSS of the tree, of the root (the driver) and of the largest Ray worker;
    CPU seconds, ``rchar`` and ``read_bytes`` accrued by any process in the tree (last values
    seen per pid, so a process that lives shorter than one interval is missed).
    """

    def __init__(self, root: int, phase: Callable[[], str], interval: float = 0.5):
        self.root, self.phase, self.interval = root, phase, interval
        self.last: dict[int, tuple[float, int, int]] = {}
        self.stats: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _phase_stats(self, name: str) -> dict[str, float]:
        return self.stats.setdefault(name, {"tree_pss_mib": 0.0, "driver_pss_mib": 0.0, "worker_pss_mib": 0.0,
                                            "cpu_s": 0.0, "rchar": 0, "read_bytes": 0, "start": time.time()})

    def sample(self) -> None:
        s = self._phase_stats(self.phase())
        pids = tree(self.root)
        pss = {p: kib(f"/proc/{p}/smaps_rollup", "Pss:") / 1024 for p in pids}
        s["tree_pss_mib"] = max(s["tree_pss_mib"], sum(pss.values()))
        s["driver_pss_mib"] = max(s["driver_pss_mib"], pss.get(self.root, 0.0))
        s["worker_pss_mib"] = max([s["worker_pss_mib"], *(v for p, v in pss.items() if is_ray_worker(p))])
        for p in pids:
            now = counters(p)
            before = self.last.get(p, (0.0, 0, 0))
            if now[0] >= before[0]:  # a reused pid would run backwards: start it afresh
                s["cpu_s"] += now[0] - before[0]
                s["rchar"] += now[1] - before[1]
                s["read_bytes"] += now[2] - before[2]
                self.last[p] = now
        s["end"] = time.time()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        for s in self.stats.values():
            s["wall_s"] = s.pop("end", s["start"]) - s.pop("start")
        return self.stats
