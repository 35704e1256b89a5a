"""The `sane-ray` command and `jobs/make_zoo.py` as a user runs them (issue 2's acceptance)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo_builders as zb
from sane_ray import storage
from sane_ray.cli import main
from sane_ray.zoo.native import MANIFEST
from sane_ray.zoo.reader import load_checkpoint, open_zoo
from test_zoo_bad_input import plant_faults

REPO = Path(__file__).resolve().parents[1]


def _info(uri: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["zoo", "info", uri, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_make_zoo_to_s3_and_local_read_back_identically(ray_cluster, s3, tmp_path, capsys):
    args = ["--models", "16", "--epochs", "5", "--seed", "3"]
    local, remote = str(tmp_path / "zoo"), f"s3://{s3['bucket']}/zoo"
    assert main(["make-zoo", "--out", local, *args]) == 0
    assert main(["make-zoo", "--out", remote, *args]) == 0
    assert storage.read_bytes(storage.join(local, MANIFEST)) == storage.read_bytes(storage.join(remote, MANIFEST))
    a, b = open_zoo(local), open_zoo(remote)
    assert [m.model_id for m in a.models] == [m.model_id for m in b.models]
    for ma, mb in zip(a.models, b.models):
        for ca, cb in zip(ma.checkpoints, mb.checkpoints, strict=True):
            ta, tb = load_checkpoint(ma, ca), load_checkpoint(mb, cb)
            assert ta.keys() == tb.keys()
            assert all(torch.equal(ta[k], tb[k]) for k in ta)
    for uri in (local, remote):
        info = _info(uri, capsys)
        assert (info["format"], info["models"], info["checkpoints"]) == ("native", 16, 16 * 6)
        assert info["architectures"] == {"cnn_digits": 16} and info["skipped"] == []
        assert 0.1 < info["accuracy"]["median"] <= 1.0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_zoo_info_json_reports_planted_faults(where, tmp_path, request, capsys):
    s3 = request.getfixturevalue("s3") if where == "s3" else None
    root = zb.root_uri(where, tmp_path, s3)
    good, bad = plant_faults(root)
    info = _info(root, capsys)
    assert info["format"] == "public"
    assert (info["models"], info["checkpoints"]) == (len(good), sum(map(len, good.values())))
    assert {s["path"]: s["reason"] for s in info["skipped"]}.keys() == bad.keys()
    assert info["architectures"] == {"cnn_mnist_public": len(good)}


def test_zoo_info_text_and_clear_errors(tmp_path, capsys):
    root = str(tmp_path / "zoo")
    zb.build_native_zoo(root, n_models=2, epochs=1)
    assert main(["zoo", "info", root]) == 0
    out = capsys.readouterr().out
    assert "native" in out and root in out
    assert main(["zoo", "info", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sane-ray: error:") and "nowhere" in err and "Traceback" not in err


def test_make_zoo_job_rejects_bad_settings_before_training(tmp_path):
    """The job file is a thin CLI: bad flags fail fast with one clear line."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "make_zoo.py"), "--out", str(tmp_path / "z"), "--arch", "nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown architecture 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "make_zoo.py"), "--modles", "3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "--modles" in proc.stderr
