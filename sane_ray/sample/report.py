"""Tables, plot and Markdown summary of a sampling job (no Ray, no storage)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sane_ray.sample.config import SampleConfig

GROUP_LABELS = {"sampled": "sampled (kept)", "prompt": "fine-tuned prompts", "scratch": "from scratch"}
NOVELTY_COLUMNS = (
    ("nearest_zoo", pa.string()), ("nearest_zoo_l2", pa.float64()), ("max_iou", pa.float64()),
    ("max_iou_zoo", pa.string()), ("nearest_prompt", pa.string()), ("nearest_prompt_l2", pa.float64()),
    ("noise_baseline_test_acc", pa.float64()), ("weight_norm", pa.float64()), ("nearest_train_l2", pa.float64()),
)


def candidate_table(rows: list[dict[str, Any]], kept: set[str], curves: list[dict[str, Any]],
                    novelty: dict[str, dict[str, Any]], broken: Callable[[dict[str, Any]], bool]) -> pa.Table:
    """Every candidate, ranked (``rows`` are sorted by score, broken ones last); kept ones with
    fine-tuning and novelty columns."""
    ft = {c["model_id"]: c["test_acc"] for c in curves if c["group"] == "sampled"}
    epochs = max((len(v) for v in ft.values()), default=1) - 1
    cols: dict[str, list] = {k: [] for k in (
        "rank", "model_id", "round", "index", "draw_seed", "kept", "broken", "val_acc", "val_loss", "test_acc", "test_loss",
        "train_acc", "path")}
    for e in range(1, epochs + 1):
        cols[f"finetuned_test_acc_{e}"] = []
    for name, _ in NOVELTY_COLUMNS:
        cols[name] = []
    for rank, r in enumerate(rows, 1):
        hp = json.loads(r["hparams"])
        for k, v in (("rank", rank), ("model_id", r["model_id"]), ("round", hp["round"]), ("index", hp["index"]),
                     ("draw_seed", str(hp["draw_seed"])), ("kept", r["model_id"] in kept), ("broken", broken(r)),
                     ("val_acc", r["val_acc"]), ("val_loss", r["val_loss"]), ("test_acc", r["test_acc"]), ("test_loss", r["test_loss"]),
                     ("train_acc", r["train_acc"]), ("path", r["path"])):
            cols[k].append(v)
        accs = ft.get(r["model_id"], [])
        for e in range(1, epochs + 1):
            cols[f"finetuned_test_acc_{e}"].append(accs[e] if e < len(accs) else None)
        nov = novelty.get(r["model_id"], {})
        for name, _ in NOVELTY_COLUMNS:
            cols[name].append(nov.get(name))
    schema = {name: t for name, t in NOVELTY_COLUMNS}
    return pa.table({k: pa.array(v, type=schema.get(k)) for k, v in cols.items()})


def curve_table(curves: list[dict[str, Any]]) -> pa.Table:
    """Long format: group, model id, fine-tuning epoch (0 = before), test accuracy."""
    rows = [(c["group"], c["model_id"], e, a) for c in curves for e, a in enumerate(c["test_acc"])]
    return pa.table({"group": [r[0] for r in rows], "model_id": [r[1] for r in rows],
                     "epoch": [r[2] for r in rows], "test_acc": [r[3] for r in rows]})


def group_curves(curves: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Group -> (models, epochs + 1) test accuracies."""
    out: dict[str, list[list[float]]] = {}
    for c in curves:
        out.setdefault(c["group"], []).append(c["test_acc"])
    return {g: np.asarray(v, dtype=np.float64) for g, v in out.items()}


def _accuracy_axes(height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(5.5, height), tight_layout=True)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _png(fig: Figure, ax: Any, xlabel: str, task: str) -> bytes:
    """Shared finish of the accuracy plots: labels, [0, 1] accuracy axis, legend, PNG bytes."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test accuracy ({task})")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def curves_png(curves: list[dict[str, Any]], task: str) -> bytes:
    """Test accuracy over fine-tuning epochs: mean and std band per group."""
    fig, ax = _accuracy_axes(3.6)
    for group, acc in group_curves(curves).items():
        epochs = np.arange(acc.shape[1])
        mean, std = acc.mean(0), acc.std(0)
        ax.plot(epochs, mean, marker="o", label=f"{GROUP_LABELS.get(group, group)} (n={len(acc)})")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    return _png(fig, ax, "fine-tuning epoch", task)


SOURCE_COLOURS = {"sampled": "tab:blue", "prompt": "tab:gray", "prompt + noise": "tab:orange",
                  "prompt average": "tab:green"}


def memorization_png(memo: list[dict[str, Any]], task: str) -> bytes:
    """Test accuracy against L2 distance to the nearest training model, one colour per source."""
    fig, ax = _accuracy_axes(3.8)
    for source, colour in SOURCE_COLOURS.items():
        pts = [(r["nearest_train_l2"], r["test_acc"]) for r in memo if r["source"] == source]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=18, alpha=0.8, color=colour, label=f"{source} (n={len(pts)})")
    return _png(fig, ax, "L2 to the nearest training model (aligned weights)", task)


def memorization_summary(memo: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per source: n and mean ± std of validation / test accuracy and distance to the nearest training model."""
    out = {}
    for source in SOURCE_COLOURS:
        rows = [r for r in memo if r["source"] == source]
        if rows:
            out[source] = {"n": len(rows), **{k: _mean_std([r[k] for r in rows])
                                              for k in ("val_acc", "test_acc", "nearest_train_l2")}}
    return out


def _beats(memo: dict[str, dict[str, Any]]) -> str:
    """One sentence: do the kept samples beat both baselines on mean test accuracy?"""
    if "sampled" not in memo:
        return ""
    mine = memo["sampled"]["test_acc"][0]
    rivals = {s: v["test_acc"][0] for s, v in memo.items() if s in ("prompt + noise", "prompt average")}
    lost = [s for s, acc in rivals.items() if not mine > acc]
    if not rivals:
        return "No baseline was built."
    verdict = "**yes**: they beat " + " and ".join(rivals) if not lost else "**no**: not better than " + " and ".join(lost)
    return f"Do the kept SANE samples beat the memorization baselines on mean test accuracy? {verdict}."


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return (float(v.mean()), float(v.std())) if len(v) else (math.nan, math.nan)


def summarize(cfg: SampleConfig, prompts: list[Any], kdes: list[Any], rows: list[dict[str, Any]],
              kept: list[dict[str, Any]], curves: list[dict[str, Any]], novelty: dict[str, dict[str, Any]],
              sample_s: float, n_broken: int = 0, memo: list[dict[str, Any]] | None = None,
              task: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's headline numbers (JSON-ready); ``n_broken``: candidates with a non-finite loss or accuracy;
    ``task``: what the job scored on (:meth:`sane_ray.sample.target.Target.describe`)."""
    groups = group_curves(curves)
    best = kept[0] if kept else None
    return {
        "config": {k: getattr(cfg, k) for k in ("run", "prompts", "task", "mode", "kde_anchor", "bandwidth", "candidates",
                                                "keep", "bootstrap", "finetune_epochs", "finetune_layers", "halo",
                                                "bn_condition", "seed")},
        "task": task or {},
        "best_kept": {"model_id": best["model_id"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]}
        if best else None,
        "prompts": [{"name": p.name, "val_acc": p.checkpoint.metrics.get("val_acc"),
                     "test_acc": p.checkpoint.metrics.get("test_acc")} for p in prompts],
        "bandwidth": [k.mean_bandwidth() for k in kdes],
        "candidates": len(rows),
        "broken": n_broken,
        "candidates_per_s": len(rows) / sample_s if sample_s > 0 else math.nan,
        "sample_s": sample_s,
        "all_test_acc": _mean_std([r["test_acc"] for r in rows]),
        "kept_val_acc": _mean_std([r["val_acc"] for r in kept]),
        "curves": {g: {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "n": len(a)} for g, a in groups.items()},
        "novelty": {k: _mean_std([n.get(k, math.nan) for n in novelty.values()])
                    for k in ("nearest_zoo_l2", "max_iou", "nearest_prompt_l2", "noise_baseline_test_acc",
                              "weight_norm")} if novelty else {},
        "novelty_rows": novelty,
        "memorization": memorization_summary(memo or []),
    }


def _pct(ms: tuple[float, float]) -> str:
    m, s = ms
    return "n/a" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def _task_lines(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    n = t["normalization"]
    scale = "as given" if n["divisor"] == 1 else f"pixels / {n['divisor']:g}"
    if n["mean"]:
        fmt = lambda v: "[" + ", ".join(f"{x:.3g}" for x in v) + "]"  # noqa: E731
        scale += f", then per-channel mean {fmt(n['mean'])} std {fmt(n['std'])} ({n['stats']})"
    head = ("a new, seeded head per model (the task's classes differ from the zoo's), fitted in closed form "
            "before ranking: accuracies before fine-tuning are *head fitted*, not zero-shot") if t["new_head"] else \
        "the zoo's own head"
    sizes = ", ".join(f"{k} {v}" for k, v in t["sizes"].items())
    return [f"Task `{t['source']}`: input {tuple(t['input_shape'])}, {t['num_classes']} classes, {sizes} "
            f"images; inputs = {scale}; {head}.", ""]


def _headline_section(s: dict[str, Any]) -> list[str]:
    """Candidates, prompts, from-scratch models and the memorization baselines side by side."""
    before = "head fitted" if (s.get("task") or {}).get("new_head") else "zero-shot"
    curves, memo = s["curves"], s.get("memorization") or {}
    last = max((len(v["mean"]) for v in curves.values()), default=1) - 1
    after = f"after {last} fine-tuning epoch(s)" if last else "(no fine-tuning)"
    lines = ["## Side by side: test accuracy (%)", "", f"| models | n | {before} | {after} |", "|---|---|---|---|"]
    if s.get("best_kept"):
        b = s["best_kept"]
        lines.append(f"| best kept candidate ({b['model_id']}, by val acc) | 1 | {100 * b['test_acc']:.1f} | |")
    for g, v in curves.items():
        cells = [f"{100 * v['mean'][0]:.1f} ± {100 * v['std'][0]:.1f}",
                 f"{100 * v['mean'][-1]:.1f} ± {100 * v['std'][-1]:.1f}" if last else ""]
        lines.append(f"| {GROUP_LABELS.get(g, g)} | {v['n']} | {cells[0]} | {cells[1]} |")
    for source, v in memo.items():
        if source not in GROUP_LABELS:  # the baselines; the kept samples and prompts are rows above
            lines.append(f"| memorization baseline: {source} | {v['n']} | {_pct(v['test_acc'])} | |")
    return lines


def _curves_section(curves: dict[str, Any]) -> list[str]:
    width = max(len(v["mean"]) for v in curves.values())
    lines = ["| group | n | " + " | ".join(f"epoch {e}" for e in range(width)) + " |", "|---|---|" + "---|" * width]
    for g, v in curves.items():
        cells = [f"{100 * m:.1f} ± {100 * sd:.1f}" for m, sd in zip(v["mean"], v["std"])]
        lines.append(f"| {GROUP_LABELS.get(g, g)} | {v['n']} | " + " | ".join(cells) + " |")
    return lines


def _novelty_section(n: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Are they new models? (kept models, mean ± std)",
        "",
        (f"- L2 to the nearest checkpoint of the run's zoo (aligned weights): {n['nearest_zoo_l2'][0]:.3f} ± "
         f"{n['nearest_zoo_l2'][1]:.3f}; to the nearest prompt {n['nearest_prompt_l2'][0]:.3f} ± "
         f"{n['nearest_prompt_l2'][1]:.3f}; own weight norm {n['weight_norm'][0]:.3f}"),
        (f"- highest IoU of misclassified test samples with a zoo checkpoint: {n['max_iou'][0]:.3f} ± "
         f"{n['max_iou'][1]:.3f}"),
        f"- prompt + noise at the same distance: test accuracy {_pct(n['noise_baseline_test_acc'])} %",
        "",
        "| kept model | nearest zoo checkpoint | L2 | max IoU (with) | nearest prompt | L2 | prompt+noise test acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for mid, r in rows.items():
        lines.append(f"| {mid} | {r.get('nearest_zoo', 'n/a')} | {r.get('nearest_zoo_l2', math.nan):.3f} | "
                     f"{r.get('max_iou', math.nan):.3f} ({r.get('max_iou_zoo', 'n/a')}) | {r['nearest_prompt']} | "
                     f"{r['nearest_prompt_l2']:.3f} | {100 * r['noise_baseline_test_acc']:.1f} |")
    return lines


def _memorization_section(memo: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Memorization baselines (mean ± std over models; BN-conditioned like the candidates)",
        "",
        "| source | n | val acc (%) | test acc (%) | L2 to the nearest training model |",
        "|---|---|---|---|---|",
    ]
    for source, v in memo.items():
        d = v["nearest_train_l2"]
        lines.append(f"| {source} | {v['n']} | {_pct(v['val_acc'])} | {_pct(v['test_acc'])} | "
                     f"{d[0]:.3f} ± {d[1]:.3f} |")
    return lines + ["", _beats(memo) + " `memorization.png`: test accuracy against the distance, "
                    "one colour per source; `memorization.csv`: every model."]


def summary_markdown(s: dict[str, Any]) -> str:
    """``summary.md``: the settings, the prompts, then one section per comparison."""
    c = s["config"]
    lines = [
        f"# Sampling: {c['mode']} (anchor per {c['kde_anchor']}) on {c['task']}",
        "",
        (f"Run `{c['run']}`, prompts from `{c['prompts'] or 'the run zoo'}`, seed {c['seed']}; "
         f"{c['candidates']} candidates per round, {c['bootstrap']} bootstrap round(s), keep {c['keep']}; "
         f"haloed decoding {'off' if c['halo'] == 0 else 'on'}, BN-conditioning {'on' if c['bn_condition'] else 'off'}."),
        "",
        *_task_lines(s.get("task") or {}),
        "Prompts: " + ", ".join(f"{p['name']} (val {p['val_acc']:.3f}, test {p['test_acc']:.3f})" for p in s["prompts"]),
        "",
        (f"KDE mean bandwidth per round: {', '.join(f'{b:.4g}' for b in s['bandwidth'])}. "
         f"{s['candidates']} candidates in {s['sample_s']:.1f} s ({s['candidates_per_s']:.2f} candidates/s: draw, "
         f"decode, BN-condition, score, write); test accuracy of all candidates {_pct(s['all_test_acc'])} %, "
         f"validation accuracy of the kept ones {_pct(s['kept_val_acc'])} %. Broken candidates (non-finite "
         f"loss or accuracy, ranked last, never kept): {s.get('broken', 0)}."),
        "",
    ]
    lines += _headline_section(s)
    lines += ["", "## Test accuracy (%) over fine-tuning epochs, mean ± std over models", ""]
    lines += _curves_section(s["curves"])
    if s["novelty"]:
        lines += _novelty_section(s["novelty"], s["novelty_rows"])
    if s.get("memorization"):
        lines += _memorization_section(s["memorization"])
    lines += ["", ("Files: `candidates.csv` / `.parquet` (ranked), `curves.csv`, `finetune.png`, zoos `candidates/` "
                   "and `kept/` (`sane-ray zoo info`).")]
    return "\n".join(lines) + "\n"
