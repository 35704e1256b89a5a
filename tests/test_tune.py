"""Hyperparameter sweeps (`sane-ray tune`, issue 11): ASHA over real pretraining trials, resume, tracking, bad input.

Trials are real Ray Train runs on a tiny zoo (one worker, 2 epochs) on the session cluster,
one trial at a time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

import zoo_builders as zb
from sane_ray.cli import main

pytestmark = pytest.mark.timeout(300)

BASE = {
    "data": {"token_size": 32, "window_size": 16, "stream_cpus": 0.5},
    "train": {"epochs": 2, "batch_size": 4, "num_threads": 1, "max_failures": 0, "optim": {"lr": 1.0e-3},
              "model": {"d_model": 32, "d_z": 8, "n_layers": 1, "n_heads": 2, "projection_dim": 8}},
    "run": {"workers": 1},
}


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tune") / "zoo")
    zb.build_native_zoo(root, n_models=8, epochs=2)
    return root


def _sweep_file(path, zoo: str, space: dict, epochs: int = 2, **top) -> str:
    pretrain = {**BASE, "data": {**BASE["data"], "zoo_uri": zoo}, "train": {**BASE["train"], "epochs": epochs}}
    path.write_text(yaml.safe_dump({"pretrain": pretrain, "space": space, "trial_cpus": 0.25, **top}))
    return str(path)


def _rows(sweep_dir: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((Path(sweep_dir) / "trials.csv").read_text())))


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tiny_zoo, tmp_path_factory):
    """A 3-trial ASHA sweep searched by Optuna over the learning rate and two token sizes (two preprocessing
    settings), 3 trials at once."""
    from sane_ray.data import pipeline

    tmp = tmp_path_factory.mktemp("asha")
    config = _sweep_file(tmp / "sweep.yaml", tiny_zoo, {
        "train.optim.lr": {"loguniform": [3.0e-4, 3.0e-3]},
        "data.token_size": {"choice": [16, 32]},
    }, name="asha", samples=3, max_concurrent=3, scheduler="asha", search="optuna", objective="val_loss",
        reduction_factor=2)
    builds = []
    real = pipeline.build_canonical
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "build_canonical", lambda *a, **k: builds.append(a[3]) or real(*a, **k))
    try:
        assert main(["tune", "--config", config, "--out", str(tmp / "sweeps")]) == 0
    finally:
        mp.undo()
    return {"dir": str(tmp / "sweeps" / "asha"), "tmp": tmp, "builds": builds}


def test_asha_sweep_writes_tables_plot_and_best(asha_sweep, tiny_zoo):
    sweep = asha_sweep["dir"]
    rows = _rows(sweep)
    assert len(rows) == 3
    for r in rows:
        stopped = int(r["epochs_run"]) < 2
        assert r["stopped_early"] == str(stopped) and r["status"] == ("stopped early" if stopped else "finished")
        assert r["data.token_size"] in ("16", "32") and 3.0e-4 <= float(r["train.optim.lr"]) <= 3.0e-3
    assert [r["base"] for r in rows].count("True") == 1  # Optuna was given the base configuration first
    best = json.loads((Path(sweep) / "best.json").read_text())
    finished = [r for r in rows if r["status"] == "finished"]
    assert best["value"] == min(float(r["objective"]) for r in finished)
    assert best["checkpoint"].startswith(best["run_uri"]) and os.path.isdir(best["checkpoint"])
    md = (Path(sweep) / "trials.md").read_text()
    assert md.splitlines()[2].startswith(f"| {best['trial_id']}")  # best first
    assert (Path(sweep) / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Best: trial {best['trial_id']}" in (Path(sweep) / "summary.md").read_text()
    # Shared preprocessing: each distinct token size was built once, before the trials, which reused it.
    assert len(set(asha_sweep["builds"])) == len(asha_sweep["builds"]) == 2
    assert len(os.listdir(tiny_zoo + ".canonical")) == 2


def test_best_config_reruns_with_pretrain_and_logs_to_mlflow(asha_sweep, monkeypatch):
    """The best config file is a pretraining config; the rerun logs its config and metrics to an MLflow file store."""
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks readers of a file store to opt in
    from mlflow.tracking import MlflowClient

    best = json.loads((Path(asha_sweep["dir"]) / "best.json").read_text())
    tmp = asha_sweep["tmp"]
    store = f"file://{tmp}/mlruns"
    argv = ["pretrain", "--config", best["config"], "--out", str(tmp / "runs"), "--epochs", "1",
            "--tracking", "mlflow", "--tracking.uri", store, "--tracking.experiment", "rerun"]
    assert main(argv) == 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("rerun").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["sane_ray.run_uri"].endswith("runs/asha-best")
    assert float(run.data.params["train.optim.lr"]) == pytest.approx(best["params"]["train.optim.lr"])
    assert run.data.params["data.token_size"] == str(best["params"]["data.token_size"])
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1]
    from sane_ray.train.report import read_metrics_csv

    written = read_metrics_csv((tmp / "runs" / "asha-best" / "metrics.csv").read_text())
    assert history[0].value == pytest.approx(written[0]["val_loss"])


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tiny_zoo, tmp_path):
    from ray.tune import Callback

    from sane_ray.config import load_config
    from sane_ray.tune.config import SweepConfig
    from sane_ray.tune.sweep import SweepInterruptedError, run_sweep

    class InterruptAfterFirst(Callback):
        """Stops the sweep the way Ctrl-C does (Tune's handler saves the state), once a trial has finished."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            os.kill(os.getpid(), signal.SIGUSR1)

    class Started(Callback):
        def __init__(self):
            self.ids = []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.ids.append(trial.trial_id)

    config = _sweep_file(tmp_path / "sweep.yaml", tiny_zoo, {"train.optim.lr": {"choice": [1.0e-3, 2.0e-3]}},
                         epochs=1, name="resume", samples=2, max_concurrent=1, scheduler="fifo",
                         out=str(tmp_path / "sweeps"))
    cfg = load_config(SweepConfig, config)
    with pytest.raises(SweepInterruptedError, match="rerun the same command to resume"):
        run_sweep(cfg, callbacks=[InterruptAfterFirst()])
    trials = tmp_path / "sweeps" / "resume" / "trials"
    done = [t for t in os.listdir(trials) if (trials / t / "model.safetensors").exists()]
    assert len(done) == 1
    stamp = os.stat(trials / done[0] / "model.safetensors").st_mtime_ns

    started = Started()
    run_sweep(cfg, callbacks=[started])
    assert done[0] not in started.ids and len(started.ids) == 1
    assert os.stat(trials / done[0] / "model.safetensors").st_mtime_ns == stamp
    rows = _rows(str(tmp_path / "sweeps" / "resume"))
    assert sorted(r["trial_id"] for r in rows) == sorted([done[0], *started.ids])
    assert all(r["status"] == "finished" and r["epochs_run"] == "1" for r in rows)


@pytest.fixture()
def no_trials(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("bad input reached the trials")

    monkeypatch.setattr("ray.tune.Tuner.fit", forbidden)


@pytest.mark.parametrize("space,flags,expect", [
    ({}, [], "search space is empty"),
    ({"train.optim.lr": [1.0e-4, 1.0e-3]}, [], "search space entry train.optim.lr must be one of"),
    ({"train.optim.lr": {"loguniform": [0, 1]}}, [], "loguniform needs low > 0"),
    ({"train.optim.lrr": {"choice": [1.0e-3]}}, [], "did you mean train.optim.lr?"),
    ({"data.token_size": {"randint": [16, 33]}}, [], "must be a choice"),
    ({"data.window_size": {"choice": [16, 100000]}}, [], "100000"),
    ({"train.optim.lr": {"choice": [1.0e-3]}}, ["--objective", "probe_r2"], "probe_every >= 1"),
    ({"train.optim.lr": {"choice": [1.0e-3]}}, ["--max-concurrent", "8"], "8 concurrent trials x (1 worker x at least 0.25 CPU"),
    ({"train.optim.lr": {"choice": [1.0e-3]}}, ["--pretrain.data.split_fractions", "[0.8,0,0.2]"],
     "has none; raise the val share"),
])
def test_bad_input_fails_before_any_trial(ray_cluster, no_trials, tiny_zoo, tmp_path, capsys, space, flags, expect):
    config = _sweep_file(tmp_path / "sweep.yaml", tiny_zoo, space, samples=2, max_concurrent=1)
    capsys.readouterr()
    assert main(["tune", "--config", config, "--out", str(tmp_path / "sweeps"), *flags]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sane-ray: error:")]
    assert len(err) == 1 and expect in err[0], err
    if "did you mean" in expect:
        assert "valid names: " in err[0] and "train.model.temperature" in err[0]


def test_the_example_sweep_file_passes_the_checks(tiny_zoo):
    """configs/sweeps/digits-search.yaml (docs/tune.md) loads and passes every check a sweep makes before trials."""
    from sane_ray.config import load_config
    from sane_ray.tune.config import SweepConfig
    from sane_ray.tune.sweep import check_sweep

    cfg = load_config(SweepConfig, str(Path(__file__).parents[1] / "configs" / "sweeps" / "digits-search.yaml"),
                      [f"pretrain.data.zoo_uri={tiny_zoo}", "search=optuna"])
    dims, base = check_sweep(cfg)
    assert {d.key for d in dims} >= {"train.optim.lr", "data.window_size"} and base.train.epochs == 10


def test_optuna_search_without_optuna_is_refused(no_trials, tiny_zoo, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else find_spec(name, *a))
    config = _sweep_file(tmp_path / "sweep.yaml", tiny_zoo, {"train.optim.lr": {"choice": [1.0e-3]}})
    assert main(["tune", "--config", config, "--search", "optuna"]) == 2
    assert "pip install 'sane-ray[optuna]'" in capsys.readouterr().err
