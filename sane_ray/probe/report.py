"""The probe job's results as the paper lays them out: tables (CSV, Markdown) and two figures.

A table is ``{row: {column: cell}}``: rows are targets (Acc, Epoch, Ggap, or a
hyperparameter), columns are methods (W, s(W), SANE, the untrained control). Cells are
floats (NaN: not computed, e.g. W for models too large to flatten) or ``(mean, std)``
for k-fold estimates.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Cell = Union[float, tuple[float, float]]
Table = Mapping[str, Mapping[str, Cell]]


def _columns(table: Table) -> list[str]:
    cols: list[str] = []
    for row in table.values():
        cols += [c for c in row if c not in cols]
    return cols


def _fmt(cell: Cell | None) -> str:
    if cell is None:
        return "n/a"
    if isinstance(cell, tuple):
        mean, std = cell
        return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"
    return "n/a" if math.isnan(cell) else f"{cell:.3f}"


def table_markdown(table: Table, corner: str = "") -> str:
    """A Markdown table, three decimals, ``n/a`` for missing cells."""
    cols = _columns(table)
    lines = [f"| {corner} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for r, row in table.items()]
    return "\n".join(lines) + "\n"


def table_csv(table: Table, corner: str = "target") -> str:
    """CSV with full precision; a k-fold cell becomes two columns ``<method>`` and ``<method>_std``."""
    cols = _columns(table)
    folded = any(isinstance(v, tuple) for row in table.values() for v in row.values())
    header = [corner] + ([x for c in cols for x in (c, f"{c}_std")] if folded else cols)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r, row in table.items():
        cells: list[str] = [r]
        for c in cols:
            v = row.get(c, math.nan)
            pair = v if isinstance(v, tuple) else (v, math.nan)
            cells += [repr(float(x)) for x in (pair if folded else pair[:1])]
        w.writerow(cells)
    return buf.getvalue()


def _new_figure(panels: int, height: float = 3.4) -> Figure:
    fig = Figure(figsize=(3.4 * max(panels, 1), height), tight_layout=True)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def predicted_vs_true_png(points: Mapping[str, tuple[np.ndarray, np.ndarray, float]], what: str = "test accuracy") -> bytes:
    """One scatter panel per method: ``{method: (true, predicted, R^2)}`` on the test split."""
    fig = _new_figure(len(points))
    for i, (method, (true, pred, r2)) in enumerate(points.items()):
        ax = fig.add_subplot(1, len(points), i + 1)
        ax.scatter(true, pred, s=6, alpha=0.5)
        lo, hi = float(np.min(true)), float(np.max(true))
        ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{method}: R² {r2:.3f}")
        ax.set_xlabel(f"true {what}")
        if i == 0:
            ax.set_ylabel(f"predicted {what}")
    return _png(fig)


def layer_spread_png(spread: np.ndarray, color: np.ndarray, label: str = "test accuracy",
                     layer_names: Sequence[str] | None = None) -> bytes:
    """Per-layer spread (paper eq. 8) over layer index, one line per model coloured by ``color``."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = _new_figure(1, 3.8)
    fig.set_size_inches(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    norm = Normalize(float(np.nanmin(color)), float(np.nanmax(color)))
    cmap = colormaps["viridis"]
    layers = np.arange(spread.shape[1])
    for row, c in zip(spread, color):
        ax.plot(layers, row, color=cmap(norm(c)), alpha=0.4, linewidth=1)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=label)
    ax.set_xlabel("layer index")
    ax.set_ylabel("spread of token embeddings")
    ax.set_xticks(layers)
    if layer_names is not None:
        ax.set_xticklabels(layer_names, rotation=30, ha="right", fontsize=7)
    return _png(fig)


def embedding_map_png(xy: np.ndarray, groups: np.ndarray, color: np.ndarray, label: str = "test accuracy") -> bytes:
    """Two panels of the same 2-D points (one per checkpoint): coloured by group (architecture) and by ``color``."""
    from matplotlib import colormaps

    fig = _new_figure(2, 3.8)
    fig.set_size_inches(10, 4.2)
    ax = fig.add_subplot(1, 2, 1)
    for i, g in enumerate(dict.fromkeys(groups.tolist())):
        m = groups == g
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=colormaps["tab10"](i % 10), label=str(g))
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title("by architecture")
    ax = fig.add_subplot(1, 2, 2)
    ok = np.isfinite(color)
    ax.scatter(xy[~ok, 0], xy[~ok, 1], s=6, color="lightgray")
    points = ax.scatter(xy[ok, 0], xy[ok, 1], s=6, c=color[ok], cmap="viridis")
    fig.colorbar(points, ax=ax, label=label)
    ax.set_title(f"by {label}")
    for ax in fig.axes[:2]:
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    return _png(fig)
