"""A pretraining run at a glance: ``metrics.csv``, a short Markdown summary and the loss-curve PNG.

All three are built from the per-epoch metric history the train loop keeps (and
checkpoints), so a resumed run reports its whole history. The CSV and the summary are
rewritten (atomically) after every epoch, so an interrupted run has them too; the
curve is drawn once, at export.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Sequence

from sane_ray import storage

History = Sequence[dict[str, float]]
LOSS_PARTS = (("loss", "total"), ("reconstruction", "reconstruction (masked MSE)"), ("contrastive", "contrastive (NT-Xent)"))


def loss_curve_png(history: History) -> bytes:
    """Train (and validation, when present) loss parts per epoch, log scale, as PNG bytes.

    The reconstruction panel also shows, dashed, the validation loss of predicting
    zeros (the trivial baseline for standardized weights).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # plotting only at export
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("no epochs in the history: nothing to plot")
    epochs = [h["epoch"] for h in history]
    probed = _probed(history)
    panels = len(LOSS_PARTS) + bool(probed)
    fig = Figure(figsize=(4 * panels, 3.6), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate(LOSS_PARTS):
        ax = fig.add_subplot(1, panels, i + 1)
        for split in ("train", "val"):
            values = [h.get(f"{split}_{key}", math.nan) for h in history]
            if any(math.isfinite(v) for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=split)
        baseline = [h.get("val_zero_baseline", math.nan) for h in history]
        if key == "reconstruction" and any(math.isfinite(v) for v in baseline):
            ax.plot(epochs, baseline, linestyle="--", color="gray", label="val, predicting zeros")
        if key != "contrastive":  # NT-Xent is bounded below by a positive constant
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    if probed:  # the probe signal (TrainConfig.probe_every): higher is better
        ax = fig.add_subplot(1, panels, panels)
        ax.plot(*zip(*probed), marker="o", markersize=3)
        ax.set_title("probe R² (test acc, val models)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _probed(history: History) -> list[tuple[float, float]]:
    """(epoch, val_probe_r2) of the epochs that ran the probe signal."""
    return [(h["epoch"], h["val_probe_r2"]) for h in history if math.isfinite(h.get("val_probe_r2", math.nan))]


def summary_markdown(history: History, title: str = "SANE pretraining") -> str:
    """Final and best losses, the validation baseline, and throughput, as a small Markdown document."""
    if not history:
        raise ValueError("no epochs in the history: nothing to summarize")
    last = history[-1]
    rows = [("epochs", f"{int(last['epoch'])}")]
    for key in ("train_loss", "train_reconstruction", "train_contrastive", "val_loss", "val_reconstruction", "val_contrastive"):
        if key in last and math.isfinite(last[key]):
            best = min(h[key] for h in history if key in h and math.isfinite(h[key]))
            rows.append((key, f"{last[key]:.5g} (best {best:.5g})"))
    probed = _probed(history)
    if probed:
        rows.append(("val_probe_r2", f"{probed[-1][1]:.4g} at epoch {int(probed[-1][0])} "
                                     f"(best {max(r for _, r in probed):.4g}; test-accuracy probe on val models)"))
    if math.isfinite(last.get("val_zero_baseline", math.nan)):
        rows.append(("val_zero_baseline", f"{last['val_zero_baseline']:.5g} (val reconstruction when predicting zeros)"))
    for key, fmt in (("tokens_per_s", "{:,.0f}"), ("windows_per_s", "{:,.1f}"), ("data_wait_fraction", "{:.1%}"), ("lr", "{:.3g}")):
        if key in last:
            rows.append((key, fmt.format(last[key])))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# {title}\n\n{baseline_sentence(last)}Last epoch, and the best value over all epochs.\n\n"
            f"| metric | value |\n|---|---|\n{table}\n")


def baseline_sentence(last: dict[str, float]) -> str:
    """The final validation reconstruction against predicting zeros, as a paragraph ("" without validation)."""
    rec, zero = last.get("val_reconstruction", math.nan), last.get("val_zero_baseline", math.nan)
    if not (math.isfinite(rec) and math.isfinite(zero) and zero > 0):
        return ""
    return (f"Validation reconstruction (masked MSE on standardized weights) ends at {rec:.4g}, "
            f"{rec / zero:.1%} of the trivial baseline of predicting zeros ({zero:.4g}).\n\n")


def metrics_csv(history: History) -> str:
    """One row per epoch, one column per metric the loop reported (in first-seen order; empty where an epoch lacks it)."""
    columns = list(dict.fromkeys(k for h in history for k in h))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(float(v)) for k, v in h.items()} for h in history)
    return buf.getvalue()


def read_metrics_csv(text: str) -> list[dict[str, float]]:
    """The history back from :func:`metrics_csv` (missing values left out)."""
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(io.StringIO(text))]


def write_epoch_report(history: History, uri: str, title: str = "SANE pretraining") -> None:
    """Write ``metrics.csv`` and ``summary.md`` under ``uri`` (after every epoch)."""
    storage.makedirs(uri)
    storage.write_bytes_atomic(storage.join(uri, "metrics.csv"), metrics_csv(history).encode())
    storage.write_bytes_atomic(storage.join(uri, "summary.md"), summary_markdown(history, title).encode())


def write_run_report(history: History, uri: str, title: str = "SANE pretraining") -> None:
    """Write ``metrics.csv``, ``summary.md`` and ``loss_curve.png`` under ``uri``."""
    write_epoch_report(history, uri, title)
    storage.write_bytes_atomic(storage.join(uri, "loss_curve.png"), loss_curve_png(history))
