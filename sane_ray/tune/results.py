"""A finished sweep's results: the best configuration, a table of all trials, and the objective per epoch.

Written atomically into the sweep directory:

- ``best_config.yaml``: the best trial's pretraining config, for ``jobs/pretrain.py --config``
  (its ``run.name`` is ``<sweep>-best`` and ``run.out`` the default, so a rerun trains anew);
- ``best.json``: the best trial, its objective, its run directory and newest checkpoint;
- ``trials.csv`` and ``trials.md``: one row per trial (parameters, objective, epochs run,
  stopped early or not, its run directory), best first in the Markdown table;
- ``objective.png``: the objective of every trial over its epochs;
- ``summary.md``: the sweep at a glance.

Every trial's history is read from its own run directory (``metrics.csv``, which a
resumed trial extends), not from Tune's logs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import posixpath
from typing import Any

from sane_ray import storage
from sane_ray.config import dump_config, with_values
from sane_ray.pretrain_config import PretrainConfig
from sane_ray.train.report import read_metrics_csv
from sane_ray.tune.config import OBJECTIVES, SweepConfig
from sane_ray.tune.space import Dimension


def trial_config(base: PretrainConfig, params: dict[str, Any], name: str) -> PretrainConfig:
    """The pretraining config of a trial's parameters, to rerun with ``jobs/pretrain.py --config``."""
    cfg = with_values(base, params)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out="", name=name))


def _history(trials_uri: str, trial_id: str) -> list[dict[str, float]]:
    path = storage.join(trials_uri, trial_id, "metrics.csv")
    return read_metrics_csv(storage.read_bytes(path).decode()) if storage.exists(path) else []


def trial_rows(grid: Any, cfg: SweepConfig, dims: list[Dimension], base: PretrainConfig,
               base_point: dict[str, Any] | None, trials_uri: str) -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid``, with its per-epoch objective under ``history``."""
    metric, _ = OBJECTIVES[cfg.objective]
    rows = []
    for result in grid:
        trial_id = result.metrics.get("trial_id") or posixpath.basename(str(result.path).rstrip("/"))
        params = {d.key: result.config[d.key] for d in dims}
        history = _history(trials_uri, trial_id)
        curve = [(h["epoch"], h[metric]) for h in history if math.isfinite(h.get(metric, math.nan))]
        epochs_planned = with_values(base, params).train.epochs
        epochs_run = int(history[-1]["epoch"]) if history else 0
        error = result.error is not None
        rows.append({
            "trial_id": trial_id,
            **params,
            "objective": curve[-1][1] if curve else math.nan,
            "epochs_run": epochs_run,
            "epochs_planned": epochs_planned,
            "stopped_early": not error and epochs_run < epochs_planned,
            "status": "error" if error else "stopped early" if epochs_run < epochs_planned else "finished",
            "base": base_point is not None and all(_same(params[k], v) for k, v in base_point.items()),
            "run_uri": storage.join(trials_uri, trial_id),
            "history": curve,
            "checkpoint_path": result.metrics.get("checkpoint_path", ""),
        })
    return rows


def _same(a: Any, b: Any) -> bool:
    return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best final objective among trials that ran all their epochs (any trial if none did)."""
    scored = [r for r in rows if math.isfinite(r["objective"])]
    finished = [r for r in scored if r["status"] == "finished"] or scored
    if not finished:
        raise ValueError("no trial reported the objective: see the trials' errors in trials.md")
    sign = 1 if mode == "min" else -1
    return min(finished, key=lambda r: sign * r["objective"])


_COLUMNS = ("trial_id", "status", "objective", "epochs_run", "epochs_planned", "stopped_early", "base", "run_uri")


def trials_csv(rows: list[dict[str, Any]], dims: list[Dimension]) -> str:
    columns = [*_COLUMNS[:1], *(d.key for d in dims), *_COLUMNS[1:]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def trials_markdown(rows: list[dict[str, Any]], dims: list[Dimension], mode: str) -> str:
    """The trials table, best objective first (trials without it last)."""
    sign = 1 if mode == "min" else -1
    ordered = sorted(rows, key=lambda r: (not math.isfinite(r["objective"]), sign * r["objective"]
                                          if math.isfinite(r["objective"]) else 0.0))
    columns = ["trial", *(d.key for d in dims), "objective", "epochs", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in ordered:
        cells = [r["trial_id"] + (" (base)" if r["base"] else ""), *(_fmt(r[d.key]) for d in dims),
                 _fmt(r["objective"]), f"{r['epochs_run']}/{r['epochs_planned']}", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def objective_png(rows: list[dict[str, Any]], metric: str, best_id: str) -> bytes:
    """The objective of every trial over its epochs; stopped trials dashed, the best one bold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        if not r["history"]:
            continue
        epochs, values = zip(*r["history"])
        best = r["trial_id"] == best_id
        ax.plot(epochs, values, marker="o", markersize=3, linestyle="--" if r["stopped_early"] else "-",
                linewidth=2.5 if best else 1.0, label=r["trial_id"] + (" (best)" if best else "")
                + (" (base)" if r["base"] else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (dashed: stopped early)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _checkpoint_uri(row: dict[str, Any]) -> str:
    """The newest checkpoint the trial reported, under its run directory ("" if none)."""
    name = posixpath.basename(str(row["checkpoint_path"]).rstrip("/"))
    return storage.join(row["run_uri"], name) if name else ""


def write_results(grid: Any, cfg: SweepConfig, dims: list[Dimension], base: PretrainConfig,
                  base_point: dict[str, Any] | None, uri: str, trials_uri: str, wall_s: float) -> dict[str, Any]:
    """Write every result file of a finished sweep into ``uri``; returns the best trial's row."""
    metric, mode = OBJECTIVES[cfg.objective]
    rows = trial_rows(grid, cfg, dims, base, base_point, trials_uri)
    trials_md = trials_markdown(rows, dims, mode)
    storage.write_bytes_atomic(storage.join(uri, "trials.csv"), trials_csv(rows, dims).encode())
    storage.write_bytes_atomic(storage.join(uri, "trials.md"), trials_md.encode())
    best = best_row(rows, mode)
    storage.write_bytes_atomic(storage.join(uri, "objective.png"), objective_png(rows, metric, best["trial_id"]))
    best_cfg = trial_config(base, {d.key: best[d.key] for d in dims}, f"{cfg.name}-best")
    storage.write_bytes_atomic(storage.join(uri, "best_config.yaml"), dump_config(best_cfg).encode())
    info = {"trial_id": best["trial_id"], "objective": cfg.objective, "metric": metric, "value": best["objective"],
            "params": {d.key: best[d.key] for d in dims}, "run_uri": best["run_uri"],
            "checkpoint": _checkpoint_uri(best), "config": storage.join(uri, "best_config.yaml")}
    storage.write_bytes_atomic(storage.join(uri, "best.json"), json.dumps(info, indent=2, default=str).encode())
    storage.write_bytes_atomic(storage.join(uri, "summary.md"),
                               summary_markdown(cfg, rows, best, metric, wall_s, trials_md).encode())
    return best


def summary_markdown(cfg: SweepConfig, rows: list[dict[str, Any]], best: dict[str, Any], metric: str,
                     wall_s: float, trials_md: str) -> str:
    base = next((r for r in rows if r["base"]), None)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped early", "error")}
    lines = [
        f"# Sweep {cfg.name}", "",
        (f"{len(rows)} trials ({counts['finished']} finished, {counts['stopped early']} stopped early, "
         f"{counts['error']} failed), {cfg.search} search, {cfg.scheduler} scheduler, objective {metric} "
         f"({OBJECTIVES[cfg.objective][1]} of the last epoch). Wall time of this invocation: {wall_s:.0f} s."), "",
        f"Best: trial {best['trial_id']} with {metric} = {best['objective']:.4g}"
        + (f"; the base configuration (trial {base['trial_id']}): {base['objective']:.4g}" if base else "") + ".",
        f"Its config: `best_config.yaml`; its run: `{best['run_uri']}`.", "",
        trials_md,
    ]
    return "\n".join(lines)
