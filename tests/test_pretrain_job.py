"""The main job (`sane-ray pretrain` / `jobs/pretrain.py`) as a user runs it (issue 4's acceptance).

Bad input must fail in the driver, in one line, before any data is preprocessed or any
Ray Train worker starts.
"""

from __future__ import annotations

import time

import pytest

import zoo_builders as zb
from sane_ray.cli import main

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("pretrain-job") / "zoo")
    zb.build_native_zoo(root, n_models=8, epochs=2)
    return root


@pytest.fixture()
def no_work(monkeypatch):
    """Any preprocessing or training fails the test: bad input must be caught before either."""

    def forbidden(*args, **kwargs):
        raise AssertionError("bad input reached preprocessing or training")

    monkeypatch.setattr("sane_ray.data.pipeline.build_canonical", forbidden)
    monkeypatch.setattr("sane_ray.train.trainer.run_pretraining", forbidden)


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit with 2 within seconds. Returns stderr."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(["pretrain", *argv])
    except SystemExit as e:  # argparse rejects unknown flags itself
        code = e.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert elapsed < 15, f"bad input took {elapsed:.1f} s to report"
    return err


def test_missing_zoo(ray_cluster, no_work, tmp_path, capsys):
    where = str(tmp_path / "no-such-zoo")
    err = _fails(["--zoo", where, "--out", str(tmp_path / "runs")], capsys)
    assert err.startswith("sane-ray: error:") and where in err


def test_missing_s3_zoo(ray_cluster, no_work, s3, tmp_path, capsys):
    where = f"s3://{s3['bucket']}/nothing-here"
    err = _fails(["--zoo", where, "--out", str(tmp_path / "runs")], capsys)
    assert err.startswith("sane-ray: error:") and "nothing-here" in err


def test_unknown_config_key(no_work, capsys):
    err = _fails(["--train.nope", "1"], capsys)
    assert "--train.nope" in err


def test_more_workers_than_the_cluster_holds(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--workers", "64"], capsys)
    assert "64 workers" in err and "cluster has 6" in err and "run.autoscaling" in err


def test_workers_leave_no_cpu_for_the_data_stream(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    """6 one-CPU workers fit the 6-CPU cluster, but then no window is ever drawn: refuse, don't hang."""
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--workers", "6"], capsys)
    assert "data stream" in err and "need 7 CPU" in err


def test_gpus_on_a_cpu_cluster(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--gpus-per-worker", "1"], capsys)
    assert "need 2 GPU" in err and "cluster has 0" in err


def test_window_longer_than_every_model(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--preset", "tiny", "--window", "100000"], capsys)
    assert "100000" in err and "window" in err


@pytest.mark.parametrize(
    "name,text,expect",
    [
        ("missing.yaml", None, "config file not found"),
        ("bad.yaml", "train: {epochs: [1\n", "cannot parse config file"),
        ("typo.yaml", "train:\n  epoch: 3\n", "epoch"),
        ("type.toml", "[train]\nepochs = \"many\"\n", "train.epochs"),
        ("range.yaml", "train:\n  optim:\n    lr: -1\n", "lr must be positive"),
        ("config.txt", "train: {}\n", "must end in .yaml"),
    ],
)
def test_bad_config_file(no_work, tmp_path, capsys, name, text, expect):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    err = _fails(["--config", str(path)], capsys)
    assert err.startswith("sane-ray: error:") and expect in err
