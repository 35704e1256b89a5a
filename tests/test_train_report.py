"""The run report (loss curve and summary)."""

from __future__ import annotations

import pytest

from sane_ray.train.report import loss_curve_png, summary_markdown, write_run_report

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
