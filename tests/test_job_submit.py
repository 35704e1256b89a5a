"""`ray job submit` of the main job to a running cluster, as README.md tells users to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zoo_builders as zb
from sane_ray import storage

REPO = Path(__file__).resolve().parents[1]
# Uploaded with the job only what it runs: no history, caches or benchmark output.
EXCLUDES = [".git", ".benchmarks", ".hypothesis", ".pytest_cache", ".ruff_cache", "*.egg-info", "bench", "docs"]


@pytest.mark.timeout(300)
def test_ray_job_submit_runs_the_pretraining_job(ray_job_address, tmp_path):
    zoo, out = str(tmp_path / "zoo"), str(tmp_path / "runs")
    zb.build_native_zoo(zoo, n_models=8, epochs=2)
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        "--address", ray_job_address,
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--",
        "python", "jobs/pretrain.py", "--zoo", zoo, "--out", out, "--name", "submitted", "--preset", "tiny",
        "--epochs", "1", "--workers", "1", "--batch-size", "8", "--train.num_threads", "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "RAY_ADDRESS": ""})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Connecting to existing Ray cluster" in log  # the job's driver joined this cluster
    assert "succeeded" in log and "SANE pretraining finished" in log, log[-4000:]
    run = storage.join(out, "submitted")
    assert {"model.safetensors", "sane_config.json", "summary.md"} <= set(storage.listdir(run))
