"""ResNet-18 zoos of 25-200 checkpoints through the released jobs: memory, time and bytes per size.

The zoo: CIFAR ResNet-18s (registry ``resnet18``, 10 classes, width 64: 11.2M parameters,
torchvision key names, BN included, ~45 MB per checkpoint) in the native layout, ``models``
models x ``checkpoints`` checkpoints each: a seeded default initialization plus a seeded random
walk of the parameters (``tests/zoo_builders.trajectory``; training ResNet-18s on 2 CPU cores
is too slow, and alignment, tokenization and encoding cost depend on shapes, not on
training). Each checkpoint's BN running statistics are the exact mean and variance of two
train-mode batches of CIFAR-like inputs (``bench_align.cifar_like``) through its own weights.

Per zoo, the released jobs run as subprocesses, each sampled over its process tree
(``bench/proctree.py``): ``jobs/pretrain.py`` (canonical build, then one epoch),
``jobs/probe.py`` (embeds every checkpoint, fits the probes) and ``jobs/sample.py``
(BN-conditioned sampling on ``digits32_rgb``, novelty off); ``--jobs novelty`` is the same
sampling with the novelty report on (every zoo checkpoint aligned, evaluated and compared
with the kept models). Phases inside a job are cut at its log lines.
Results go to ``OUT/results.jsonl``, one line per zoo and job::

    python bench/scale_zoo.py --out /tmp/scale --sizes 5x5 10x5 20x5 40x5
    python bench/scale_zoo.py --out /tmp/scale --sizes 5x5 10x5 --s3   # zoos on a local moto S3
    python bench/scale_zoo.py --out /tmp/scale --sizes 10x5 40x5 --reuse --jobs novelty
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "bench"), os.path.join(REPO, "tests")]

from proctree import TreeSampler  # noqa: E402

# The SANE: the `resnet` preset's token size (288) and window (256), the width cut to fit a CPU.
PRETRAIN_FLAGS = ["--preset", "resnet", "--train.model.d_model", "128", "--train.model.n_layers", "2",
                  "--train.model.n_heads", "4", "--train.model.d_z", "32", "--epochs", "1",
                  "--data.windows_per_model_epoch", "4"]
# log lines that start a phase, per job (the phase before the first one is "start")
PHASES = {
    "pretrain": [("build", r"building the canonical|reusing the canonical"), ("train", r"pretraining .* windows per pass")],
    "probe": [("embed", r"probe: embedding \d+ models"), ("fit", r"probe: pooled|probe: \w+ done|probe: architecture")],
    "sample": [("sample", r"sampling resnet18")],
    "novelty": [("sample", r"sampling resnet18"), ("novelty", r"novelty: comparing")],
}
SCRIPT = {"novelty": "sample"}  # measured jobs that are another job with other flags


def build_zoo(root: str, models: int, checkpoints: int) -> int:
    """Write the zoo (module doc) and publish its manifest; returns its checkpoint bytes."""
    import torch
    from bench_align import cifar_like
    from torch import nn
    from zoo_builders import fake_metrics, trajectory

    from sane_ray.zoo import native
    from sane_ray.zoo.architectures import build_model

    torch.set_num_threads(2)
    rows = []
    for i in range(models):
        model = build_model("resnet18")
        for epoch, sd in enumerate(trajectory("resnet18", seed=i, epochs=checkpoints - 1, step=0.01)):
            model.load_state_dict(sd)
            gen = torch.Generator().manual_seed(1000 * i + epoch)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.reset_running_stats()
                        m.momentum = None  # cumulative: the exact mean over the batches
                model.train()
                for _ in range(2):
                    model(cifar_like(16, gen))
            sd = model.state_dict()
            rows.append(native.write_checkpoint(root, f"m{i:03d}", epoch, sd, fake_metrics(i, epoch), "resnet18", {},
                                                {"seed": i, "walk_step": 0.01}))
    native.publish_manifest(root, rows, {"source": "bench/scale_zoo.py", "task": "digits32_rgb"})
    return sum(r["nbytes"] for r in rows)


def zoo_bytes(zoo: str) -> int:
    """Checkpoint bytes of a published native zoo, from its manifest."""
    import io

    import pyarrow.parquet as pq

    from sane_ray import storage
    from sane_ray.zoo.native import MANIFEST

    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(zoo, MANIFEST))), columns=["nbytes"])
    return int(sum(table.column("nbytes").to_pylist()))


def uri_bytes(uri: str) -> int:
    """Bytes of every file under a local directory or an s3:// prefix."""
    from sane_ray import storage

    fs, path = storage.open_uri(uri)
    return sum(v["size"] for v in fs.find(path, detail=True).values())


class S3Bytes:
    """WSGI middleware on the moto server: body bytes it sent (GET) and received (PUT/POST).

    ``rchar`` misses socket reads (``recv`` is not a read call), so this is what the jobs
    read from and wrote to S3."""

    def __init__(self, app: Any) -> None:
        self.app, self.sent, self.received, self.requests = app, 0, 0, 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.requests += 1
        self.received += int(environ.get("CONTENT_LENGTH") or 0)
        for chunk in self.app(environ, start_response):
            self.sent += len(chunk)
            yield chunk

    def snapshot(self) -> tuple[int, int, int]:
        return self.sent, self.received, self.requests


S3: S3Bytes | None = None  # set by start_s3


def run_job(job: str, args: list[str], env: dict[str, str], log_path: str) -> dict[str, Any]:
    """Run ``jobs/<job>.py`` with ``args``; its tree's figures per phase (see :class:`TreeSampler`),
    and per phase the bytes it read from and wrote to S3 when the zoo is there."""
    phase = ["start"]
    marks = [("start", time.time(), S3.snapshot() if S3 else None)]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "jobs", f"{SCRIPT.get(job, job)}.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, lambda: phase[0])
    order = [n for n, _ in PHASES[job]]
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            now = order.index(phase[0]) if phase[0] in order else -1
            for name, pattern in PHASES[job][now + 1:]:  # phases only move forward
                if re.search(pattern, line):
                    sampler.sample()  # close the old phase at its last moment
                    phase[0] = name
                    marks.append((name, time.time(), S3.snapshot() if S3 else None))
                    break
    rc = proc.wait()
    end = time.time()
    stats = sampler.stop()
    for (name, t0, s0), (_, t1, s1) in zip(marks, [*marks[1:], ("end", end, S3.snapshot() if S3 else None)]):
        stats.setdefault(name, {})["wall_s"] = t1 - t0
        if s0 is not None:
            stats[name].update(s3_read=s1[0] - s0[0], s3_written=s1[1] - s0[1], s3_requests=s1[2] - s0[2])
    return {"job": job, "rc": rc, "wall_s": end - marks[0][1], "phases": stats}


def train_figures(run: str) -> dict[str, float]:
    """The last epoch's throughput of a finished run, from the metrics it exported."""
    import csv

    with open(os.path.join(run, "metrics.csv")) as f:
        last = list(csv.DictReader(f))[-1]
    return {k: float(last[k]) for k in ("tokens_per_s", "windows_per_s", "data_wait_fraction") if last.get(k)}


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def measure(zoo: str, name: str, out: str, env: dict[str, str], jobs: list[str], zoo_bytes: int,
            batch_size: int) -> list[dict[str, Any]]:
    """The released jobs on one zoo, one after the other; a result row per job."""
    runs = os.path.join(out, "runs")
    run = os.path.join(runs, name)
    sample = ["--run", run, "--task", "digits32_rgb", "--candidates", "4", "--keep", "2", "--bn_batches", "4",
              "--candidates_per_task", "2"]
    argv = {
        "pretrain": ["--zoo", zoo, "--out", runs, "--name", name, *PRETRAIN_FLAGS, "--batch-size", str(batch_size)],
        "probe": ["--run", run, "--control", "false", "--out", os.path.join(out, f"probe-{name}")],
        "sample": [*sample, "--novelty", "false", "--out", os.path.join(out, f"sample-{name}")],
        "novelty": [*sample, "--novelty", "true", "--out", os.path.join(out, f"novelty-{name}")],
    }
    rows: list[dict[str, Any]] = []
    for job in jobs:
        if job == "pretrain":
            shutil.rmtree(run, ignore_errors=True)  # a run left from an earlier measurement would resume
        before = load()
        res = run_job(job, argv[job], env, os.path.join(out, f"{job}-{name}.log"))
        res.update(zoo=zoo, name=name, zoo_bytes=zoo_bytes, load_before=before, load_after=load(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
        if job == "pretrain" and res["rc"] == 0:
            res["canonical_bytes"] = uri_bytes(zoo.rstrip("/") + ".canonical")
            res["train"] = train_figures(run)
        rows.append(res)
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
        print(json.dumps(res), flush=True)
        if res["rc"] != 0:
            break
    return rows


def report(out: str) -> str:
    """A markdown table of ``OUT/results.jsonl``: one row per zoo and job phase, the last result of each."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with open(os.path.join(out, "results.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[(r["name"], r["job"])] = r
    lines = ["| zoo | job | phase | wall s | CPU s | tree PSS MiB | driver PSS MiB | largest worker PSS MiB | "
             "read calls GB | extra | load before / after |", "|---" * 11 + "|"]
    for (name, job), r in rows.items():
        extra = {}
        if job == "pretrain" and "canonical_bytes" in r:
            extra = {"build": f"canonical {r['canonical_bytes'] / 1e9:.2f} GB = "
                              f"{r['canonical_bytes'] / r['zoo_bytes']:.2f}x the zoo",
                     "train": f"{r['train'].get('tokens_per_s', 0):,.0f} tokens/s"}
        for phase, p in r["phases"].items():
            if "s3_read" in p:
                extra[phase] = ", ".join(filter(None, [extra.get(phase), f"S3 read {p['s3_read'] / 1e9:.2f} GB, "
                                                       f"written {p['s3_written'] / 1e9:.2f} GB"]))
            lines.append(f"| {name} ({r['zoo_bytes'] / 1e9:.2f} GB) | {job} | {phase} | {p['wall_s']:.0f} | "
                         f"{p.get('cpu_s', 0):.0f} | {p.get('tree_pss_mib', 0):,.0f} | {p.get('driver_pss_mib', 0):,.0f} | "
                         f"{p.get('worker_pss_mib', 0):,.0f} | {p.get('rchar', 0) / 1e9:.2f} | "
                         f"{extra.get(phase, '')} | {r['load_before']} / {r['load_after']} |")
    return "\n".join(lines + ["", *goals(rows)])


def checkpoints(name: str) -> int:
    models, ckpts = name.rsplit("-", 1)[1].split("x")
    return int(models) * int(ckpts)


def goals(rows: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """The issue's goals from smallest to largest zoo of each storage: peak tree PSS per job, and per
    checkpoint the CPU and wall seconds of the phases whose work grows with the zoo."""
    lines = []
    for store in ("local", "s3"):
        names = sorted({n for n, _ in rows if n.startswith("s3-") == (store == "s3")}, key=checkpoints)
        if len(names) < 2:
            continue
        small, big = names[0], names[-1]
        ratio = checkpoints(big) / checkpoints(small)
        lines.append(f"{store}: {small} -> {big} ({ratio:.0f}x the checkpoints)")
        for job in PHASES:
            a, b = rows.get((small, job)), rows.get((big, job))
            if not (a and b and a["rc"] == 0 == b["rc"]):
                continue
            peak = [max(p.get("tree_pss_mib", 0) for p in r["phases"].values()) for r in (a, b)]
            line = f"  {job}: peak tree PSS {peak[0]:,.0f} -> {peak[1]:,.0f} MiB ({peak[1] / peak[0]:.2f}x)"
            for phase in ("build", "embed", "novelty"):
                if phase in a["phases"] and phase in b["phases"]:
                    pa_, pb = a["phases"][phase], b["phases"][phase]
                    line += (f"; {phase} per checkpoint {pb['cpu_s'] / checkpoints(big) / (pa_['cpu_s'] / checkpoints(small)):.2f}x "
                             f"CPU, {pb['wall_s'] / checkpoints(big) / (pa_['wall_s'] / checkpoints(small)):.2f}x wall")
            whole = b["wall_s"] / a["wall_s"] / ratio
            lines.append(line + f"; job wall {whole:.2f}x linear")
        canon = [r["canonical_bytes"] / r["zoo_bytes"] for (n, j), r in rows.items() if j == "pretrain" and n in names
                 and "canonical_bytes" in r]
        if canon:
            lines.append(f"  canonical copy at most {max(canon):.2f}x the zoo")
    for (name, job), r in rows.items():  # S3 against the same zoo on local disk
        local = rows.get((name.removeprefix("s3-"), job))
        if not name.startswith("s3-") or not local:
            continue
        for phase in ("build", "train", "embed"):
            if phase in r["phases"] and phase in local["phases"]:
                p, q = r["phases"][phase], local["phases"][phase]
                lines.append(f"{name} {job} {phase}: {p['wall_s']:.0f} s on S3 vs {q['wall_s']:.0f} s local "
                             f"({q['wall_s'] / p['wall_s']:.2f}x the local throughput); S3 read "
                             f"{p.get('s3_read', 0) / r['zoo_bytes']:.2f}x the zoo vs read calls "
                             f"{q['rchar'] / r['zoo_bytes']:.2f}x locally")
    return lines


def start_s3() -> tuple[Any, dict[str, str]]:
    """A moto S3 server on a free port of 127.0.0.1 (in this process) and the AWS variables for it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    global S3
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    S3 = server._server.app = S3Bytes(server._server.app)  # werkzeug looks the app up per request
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="scale")
    return server, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="zoos, runs, logs and results.jsonl")
    ap.add_argument("--sizes", nargs="+", default=["5x5", "10x5", "20x5", "40x5"], help="MODELSxCHECKPOINTS")
    ap.add_argument("--jobs", nargs="+", default=["pretrain", "probe", "sample"],
                    help="of pretrain, probe, sample, novelty (sampling with the zoo comparison on)")
    ap.add_argument("--batch-size", type=int, default=16, help="SANE training batch (windows per step)")
    ap.add_argument("--reuse", action="store_true", help="measure zoos already written (zoos.jsonl)")
    ap.add_argument("--s3", action="store_true", help="zoos (and their canonical copies) on a local moto S3")
    ap.add_argument("--report", action="store_true", help="print the table of OUT/results.jsonl and exit")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if args.report:
        print(report(out))
        return
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    if args.s3:
        _server, s3_env = start_s3()
        env.update(s3_env)
    for size in args.sizes:
        models, checkpoints = map(int, size.split("x"))
        name = f"{'s3-' if args.s3 else ''}r18-{models}x{checkpoints}"
        zoo = f"s3://scale/{name}" if args.s3 else os.path.join(out, "zoos", name)
        t0 = time.perf_counter()
        nbytes = zoo_bytes(zoo) if args.reuse else build_zoo(zoo, models, checkpoints)
        print(f"zoo {zoo}: {models * checkpoints} checkpoints, {nbytes / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f} s (load {load()})", flush=True)
        measure(zoo, name, out, env, args.jobs, nbytes, args.batch_size)
        with open(os.path.join(out, "zoos.jsonl"), "a") as f:
            f.write(json.dumps({"name": name, "zoo": zoo, "models": models, "checkpoints": checkpoints,
                                "zoo_bytes": nbytes}) + "\n")


if __name__ == "__main__":
    main()
