"""The main job (`sane-ray pretrain` / `jobs/pretrain.py`) as a user runs it (issue 4's acceptance).

Bad input must fail in the driver, in one line, before any data is preprocessed or any
Ray Train worker starts.
"""

from __future__ import annotations

import re
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
    monkeypatch.setattr("sane_ray.train.trainer.train_sane", forbidden)


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI in-process; it must exit with 2 within seconds. Returns the error line."""
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = main(["pretrain", *argv])
    except SystemExit as e:  # argparse rejects unknown flags itself
        code = e.code
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err  # may also hold the in-process S3 server's request log
    assert code == 2, err
    assert "Traceback" not in err
    assert elapsed < 15, f"bad input took {elapsed:.1f} s to report"
    lines = [line for line in err.splitlines() if line.startswith("sane-ray: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_zoo(ray_cluster, no_work, tmp_path, capsys):
    where = str(tmp_path / "no-such-zoo")
    err = _fails(["--zoo", where, "--out", str(tmp_path / "runs")], capsys)
    assert where in err


def test_missing_s3_zoo(ray_cluster, no_work, s3, tmp_path, capsys):
    where = f"s3://{s3['bucket']}/nothing-here"
    err = _fails(["--zoo", where, "--out", str(tmp_path / "runs")], capsys)
    assert "nothing-here" in err


def test_unknown_config_key(no_work, capsys):
    err = _fails(["--train.nope", "1"], capsys)
    assert "--train.nope" in err


def test_more_workers_than_the_cluster_holds(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--workers", "64"], capsys)
    assert "64 workers" in err and "cluster has 6" in err and "run.autoscaling" in err


def test_workers_leave_no_cpu_for_the_data_stream(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    """6 one-CPU workers fit the 6-CPU cluster, but then no window is ever drawn: refuse, don't hang."""
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--workers", "6", "--run.cpus_per_worker", "1"],
                 capsys)
    assert "data stream" in err and "need 6.5 CPU" in err


def test_gpus_on_a_cpu_cluster(ray_cluster, no_work, tiny_zoo, tmp_path, capsys):
    err = _fails(["--zoo", tiny_zoo, "--out", str(tmp_path / "runs"), "--gpus-per-worker", "1"], capsys)
    assert "1 worker x 1 GPU need 1 GPU" in err and "cluster has 0" in err


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
    assert expect in err


def _interrupt_after(epoch: int):
    """An ``on_epoch_end`` hook that fails every worker once ``epoch`` is checkpointed."""

    def hook(rank: int, done: int) -> None:
        if done == epoch:
            # every rank's checkpoint upload is done first: a rank still uploading when
            # another fails leaves an incomplete checkpoint, which resume rightly skips
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
            raise RuntimeError("interrupted")

    return hook


def _checkpoints(run: str) -> list[str]:
    """Ray Train's checkpoint directories (``checkpoint_<timestamp>``) in a run directory."""
    from sane_ray import storage

    return [p for p in storage.listdir(run) if re.fullmatch(r"checkpoint_\d{4}-.*", p)]


@pytest.fixture()
def train_hooks(monkeypatch):
    """Run the job's trainer with a test hook and no scheduling retries; collect its results."""
    from sane_ray.train import trainer

    results, real = [], trainer.train_sane
    hooks = {"on_epoch_end": None}

    def run(*args, **kwargs):
        kwargs.update(on_epoch_end=hooks["on_epoch_end"], controller_failure_limit=0)
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(trainer, "train_sane", run)
    return hooks, results


def test_s3_run_is_interrupted_and_resumes(ray_cluster, s3, train_hooks, capsys):
    """Zoo, canonical cache, checkpoints and exported model all in S3; a rerun with the same
    --out/--name continues from the last checkpoint and finishes the planned schedule."""
    from sane_ray import storage
    from sane_ray.model.export import load_sane

    hooks, results = train_hooks
    bucket = s3["bucket"]
    zoo, out = f"s3://{bucket}/zoo", f"s3://{bucket}/runs"
    zb.build_native_zoo(zoo, n_models=8, epochs=2)
    argv = ["pretrain", "--zoo", zoo, "--out", out, "--name", "s3run", "--preset", "tiny", "--workers", "2",
            "--epochs", "2", "--batch-size", "4", "--train.num_threads", "1", "--train.optim.lr", "1e-3",
            "--train.max_failures", "0"]

    hooks["on_epoch_end"] = _interrupt_after(1)
    capsys.readouterr()
    assert main(argv) == 1  # a failed run: one line naming the cause and the run directory
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sane-ray: error:")]
    assert len(errors) == 1 and f"pretraining into {out}/s3run failed" in errors[0] and "interrupted" in errors[0]
    assert not results  # train_sane raised
    run = f"{out}/s3run"
    checkpoints = _checkpoints(run)
    assert len(checkpoints) == 1
    shards = storage.listdir(storage.join(run, checkpoints[0]))
    assert ".metadata" in shards and {"__0_0.distcp", "__1_0.distcp"} <= set(shards)  # both ranks' DCP shards
    assert "model.safetensors" not in storage.listdir(run)

    hooks["on_epoch_end"] = None
    assert main(argv) == 0
    history = results[-1].return_value
    assert [h["epoch"] for h in history] == [1.0, 2.0]
    assert [h["resumed_from_epoch"] for h in history] == [0.0, 1.0]  # epoch 1 restored, only epoch 2 trained
    assert history[1]["lr"] < history[0]["lr"]  # one schedule across both runs
    assert len(_checkpoints(run)) == 2
    assert "SANE pretraining finished" in capsys.readouterr().out

    model = load_sane(run)
    assert (model.cfg.d_t, model.cfg.window_size) == (32, 16)
    assert {"summary.md", "loss_curve.png", "pretrain_config.yaml"} <= set(storage.listdir(run))
    from sane_ray.embed import load_run  # the export also carries the preprocessing, verified by checksums

    assert load_run(run, device="cpu").preprocessing.token_size == 32
    last = history[-1]
    assert 0.1 < last["val_zero_baseline"] < 10  # standardized weights: mean square near 1
    summary = storage.read_bytes(storage.join(run, "summary.md")).decode()
    assert f"{last['val_reconstruction'] / last['val_zero_baseline']:.1%} of the trivial baseline" in summary
    assert f"| val_zero_baseline | {last['val_zero_baseline']:.5g} " in summary


def test_zero_baseline_is_the_loss_of_a_model_that_predicts_zeros():
    import dataclasses

    import torch

    from sane_ray.model import SaneModel, tiny
    from sane_ray.train.runtime import select_runtime
    from sane_ray.train.step import compute_loss, zero_prediction_loss

    cfg = dataclasses.replace(tiny(), window_size=6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, cfg.d_t, generator=g)
    mask = torch.rand(3, 6, cfg.d_t, generator=g) > 0.3
    batch = {"x_i": x * mask, "x_j": 2 * x * mask, "mask": mask, "pos": torch.randint(0, 20, (3, 6, 3), generator=g)}
    model = SaneModel(cfg).eval()
    torch.nn.init.zeros_(model.decoder.out.weight)
    torch.nn.init.zeros_(model.decoder.out.bias)
    parts = compute_loss(model, batch, cfg, select_runtime(use_gpu=False))
    assert torch.allclose(zero_prediction_loss(batch), parts.reconstruction)
    expected = (5 * (x * mask) ** 2).sum() / (2 * mask.sum())  # x_i^2 + (2 x_i)^2 over both views' weights
    assert torch.allclose(zero_prediction_loss(batch), expected)


def test_progress_line_and_summary_report_the_baseline():
    from sane_ray.train.loop import _eta, progress_line
    from sane_ray.train.report import loss_curve_png, summary_markdown

    history = [
        {"epoch": float(e), "train_loss": 1.0 / e, "train_reconstruction": 0.9 / e, "train_contrastive": 2.0,
         "val_loss": 1.1 / e, "val_reconstruction": 0.5 / e, "val_contrastive": 2.1, "val_zero_baseline": 1.0,
         "tokens_per_s": 12345.0, "windows_per_s": 10.0, "data_wait_fraction": 0.08, "lr": 1e-4}
        for e in (1, 2, 3, 4)
    ]
    line = progress_line(history[1], 40, eta_s=151)
    assert line == ("epoch 2/40 | train 0.5000 (rec 0.4500) | val 0.5500 (rec 0.2500, zeros 1.0000) | "
                    "12,345 tokens/s | data wait 8% | ETA 2m31s")
    assert "val" not in progress_line({k: v for k, v in history[0].items() if not k.startswith("val")}, 1, 3600)
    assert _eta([0.0, 30.0], 10) == 300.0 and _eta([0.0, 30.0, 40.0, 50.0], 2) == 20.0  # warm-up left out
    md = summary_markdown(history)
    assert "ends at 0.125, 12.5% of the trivial baseline of predicting zeros (1)" in md
    assert "| val_zero_baseline | 1 (val reconstruction when predicting zeros) |" in md
    no_val = [{k: v for k, v in h.items() if not k.startswith("val")} for h in history]
    assert "trivial baseline" not in summary_markdown(no_val)
    assert loss_curve_png(history) != loss_curve_png([{**h, "val_zero_baseline": float("nan")} for h in history])


def test_metrics_csv_has_a_row_per_epoch_and_every_metric(tmp_path):
    from sane_ray.train.report import metrics_csv, read_metrics_csv, write_epoch_report

    history = [{"epoch": 1.0, "train_loss": 0.1 + 1e-12}, {"epoch": 2.0, "train_loss": 0.05, "val_loss": 0.2}]
    text = metrics_csv(history)
    assert text.splitlines()[0] == "epoch,train_loss,val_loss" and len(text.splitlines()) == 3
    assert read_metrics_csv(text) == history  # full precision, a missing value stays missing
    write_epoch_report(history, str(tmp_path / "run"))
    assert (tmp_path / "run" / "metrics.csv").read_text() == text
    assert (tmp_path / "run" / "summary.md").read_text().startswith("# SANE pretraining")


def test_flags_keep_the_main_jobs_defaults(monkeypatch):
    from sane_ray import pretrain
    from sane_ray.pretrain_config import PretrainConfig

    seen = []
    monkeypatch.setattr(pretrain, "run_pretrain", seen.append)
    assert main(["pretrain", "--epochs", "3", "--window", "8"]) == 0
    cfg = seen[0]
    assert (cfg.train.epochs, cfg.data.window_size) == (3, 8)
    assert cfg.train.model == PretrainConfig().train.model  # the digits model, not the reference preset
    assert cfg.data.token_size == PretrainConfig().data.token_size


LOSSES = ("train_loss", "train_reconstruction", "train_contrastive", "grad_norm",
          "val_loss", "val_reconstruction", "val_contrastive", "val_zero_baseline")


def _losses(run: str) -> list[dict[str, float]]:
    """Every epoch's losses as written to the run's ``metrics.csv``."""
    from sane_ray import storage
    from sane_ray.train.report import read_metrics_csv

    rows = read_metrics_csv(storage.read_bytes(storage.join(run, "metrics.csv")).decode())
    return [{k: row[k] for k in LOSSES} for row in rows]


@pytest.mark.timeout(480)  # four short runs
def test_same_seed_same_losses_also_when_resumed(ray_cluster, tiny_zoo, train_hooks, tmp_path):
    """One worker, CPU: a second run with the same seed writes the same losses for every
    epoch, also when it is interrupted after epoch 1 and resumed; another seed does not."""
    hooks, results = train_hooks
    out = str(tmp_path / "runs")
    argv = ["pretrain", "--zoo", tiny_zoo, "--out", out, "--preset", "tiny", "--workers", "1", "--epochs", "2",
            "--batch-size", "4", "--train.num_threads", "1", "--train.optim.lr", "1e-3", "--train.max_failures", "0"]
    assert main([*argv, "--name", "first"]) == 0
    hooks["on_epoch_end"] = _interrupt_after(1)
    assert main([*argv, "--name", "again"]) == 1  # the interrupted run: exit 1, checkpoints kept
    assert len(_losses(f"{out}/again")) == 1  # the interrupted run has its metrics too
    hooks["on_epoch_end"] = None
    assert main([*argv, "--name", "again"]) == 0
    assert [h["resumed_from_epoch"] for h in results[-1].return_value] == [0.0, 1.0]
    assert main([*argv, "--name", "other", "--train.seed", "1"]) == 0

    first, again, other = (_losses(f"{out}/{name}") for name in ("first", "again", "other"))
    assert len(first) == 2 and again == first
    changed = ("train_loss", "train_reconstruction", "train_contrastive", "grad_norm", "val_loss", "val_reconstruction")
    assert all(a[k] != b[k] for a, b in zip(first, other) for k in changed)  # (one val model: no val negatives)
