"""Export of a trained model, ``load_sane`` (local and S3), and the run report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sane_ray import storage
from sane_ray.model import SaneModel, tiny
from sane_ray.train import export_model, load_sane
from sane_ray.train.export import CONFIG_FILE, MODEL_FILE
from sane_ray.train.report import loss_curve_png, summary_markdown, write_run_report

CFG = dataclasses.replace(tiny(), window_size=8, d_model=32, d_z=8)


def _model() -> SaneModel:
    torch.manual_seed(4)
    return SaneModel(CFG)


def _check_round_trip(uri: str) -> None:
    model = _model()
    export_model(model.state_dict(), CFG, uri, extra_files={"stats.json": b'{"a": 1}'})
    loaded = load_sane(uri)
    assert loaded.cfg == CFG and not loaded.training
    x = torch.randn(2, 8, CFG.d_t)
    pos = torch.randint(0, 30, (2, 8, 3))
    torch.testing.assert_close(loaded.encode(x, pos), model.eval().encode(x, pos), rtol=0, atol=0)
    assert storage.read_bytes(storage.join(uri, "stats.json")) == b'{"a": 1}'


def test_round_trip_local(tmp_path):
    _check_round_trip(str(tmp_path / "run"))


def test_round_trip_s3(s3):
    _check_round_trip(f"s3://{s3['bucket']}/runs/r1")


def test_export_errors(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="may not be named"):
        export_model(model.state_dict(), CFG, str(tmp_path), extra_files={MODEL_FILE: b""})
    export_model(model.state_dict(), CFG, str(tmp_path))
    other = dataclasses.asdict(dataclasses.replace(CFG, d_model=64))
    (tmp_path / CONFIG_FILE).write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not match"):
        load_sane(str(tmp_path))
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="invalid SANE config"):
        load_sane(str(tmp_path))
    with pytest.raises(storage.StorageError, match="not found"):
        load_sane(str(tmp_path / "missing"))


HISTORY = [
    {"epoch": 1.0, "train_loss": 1.0, "train_reconstruction": 0.9, "train_contrastive": 2.0, "val_loss": 1.2,
     "tokens_per_s": 1000.0, "windows_per_s": 15.6, "data_wait_fraction": 0.1, "lr": 1e-4},
    {"epoch": 2.0, "train_loss": 0.5, "train_reconstruction": 0.4, "train_contrastive": 1.5, "val_loss": 0.8,
     "tokens_per_s": 1200.0, "windows_per_s": 18.8, "data_wait_fraction": 0.05, "lr": 1e-6},
]


def test_report(tmp_path):
    png = loss_curve_png(HISTORY)
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    md = summary_markdown(HISTORY)
    assert "| train_loss | 0.5 (best 0.5) |" in md and "| val_loss | 0.8 (best 0.8) |" in md
    assert "1,200" in md and "5.0%" in md
    write_run_report(HISTORY, str(tmp_path))
    assert {"loss_curve.png", "summary.md"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="no epochs"):
        summary_markdown([])
