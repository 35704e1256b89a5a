"""Ablations of the probe result (issue 9): one pretraining + probe job per variant, one table.

Each variant is the same pretraining command with a few flags changed; each runs
``jobs/pretrain.py`` (with the probe signal on) and then ``jobs/probe.py`` on the run, in
subprocesses, exactly as a user would. The table collects the validation, test-split and
grouped k-fold R^2 of test accuracy for W, s(W), SANE, the SANE embedding the probe selects on
validation and the untrained control, and the probe signal curve, as ``ablation.csv`` /
``ablation.md`` under ``--out``. The variant it names as chosen is the one with the best
*validation* R^2 of the selected SANE embedding (test scores are reported, never compared).
A variant whose run already has a ``probe/results.json`` is not rerun (reruns resume a partial table).

    python bench/bench_probe_ablation.py --zoo /tmp/zoo200 --out /tmp/ablation \
        --small-zoo /tmp/zoo100 --variants base,width,window32,paper,no_align,zoo100
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The base: the digits model of the main job, one worker, one window per checkpoint and epoch.
BASE = ["--workers", "1", "--epochs", "16", "--data.windows_per_model_epoch", "1", "--lr", "5e-4",
        "--train.probe_every", "4"]

VARIANTS: dict[str, list[str]] = {
    "base": [],
    "width": ["--train.model.d_model", "256", "--train.model.d_z", "128"],  # = --preset digits_wide
    "d_z128": ["--train.model.d_z", "128"],
    "depth4": ["--train.model.n_layers", "4"],
    "window32": ["--data.window_size", "32"],
    "token32": ["--data.token_size", "32"],
    "windows3": ["--data.windows_per_model_epoch", "3"],
    "epochs32": ["--epochs", "32"],
    "paper": ["--preset", "paper"],
    "no_align": ["--data.align", "false"],
    "no_contrast": ["--train.model.gamma", "0"],
    "zoo100": [],  # the same flags on --small-zoo (make_zoo with --models 100: its first 100 models)
}
SMALL_ZOO_VARIANTS = {"zoo100"}

METHODS = ("W", "s(W)", "SANE", "SANE (selected on val)", "SANE (untrained)")
SELECTED = "SANE (selected on val)"


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def signal_curve(run_dir: Path) -> str:
    with (run_dir / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_probe_r2") not in (None, "", "nan")]
    return " ".join(f"{float(r['val_probe_r2']):.3f}@{int(float(r['epoch']))}" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="base,width,window32,paper,no_align")
    ap.add_argument("--small-zoo", default="", help="the zoo of the zoo-size variant (zoo100)")
    ap.add_argument("--extra", default="", help="flags added to every pretraining command")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants.split(","):
        flags = VARIANTS[name]
        run_dir = out / "runs" / name
        res_file = run_dir / "probe" / "results.json"
        if not res_file.exists():
            zoo = args.small_zoo if name in SMALL_ZOO_VARIANTS else args.zoo
            if not zoo:
                raise SystemExit(f"variant {name} needs --small-zoo")
            t_pre = run([str(ROOT / "jobs/pretrain.py"), "--zoo", zoo, "--out", str(out / "runs"),
                         "--name", name, *BASE, *args.extra.split(), *flags], out / f"{name}.pretrain.log")
            t_probe = run([str(ROOT / "jobs/probe.py"), "--run", str(run_dir)], out / f"{name}.probe.log")
            (run_dir / "probe" / "wall.json").write_text(json.dumps({"pretrain_s": t_pre, "probe_s": t_probe}))
        res = json.loads(res_file.read_text())
        wall = json.loads((run_dir / "probe" / "wall.json").read_text())
        row = {"variant": name, "flags": " ".join(flags) or "(base)"}
        for m in METHODS:
            row[f"val {m}"] = res.get("val_r2", {}).get("Acc", {}).get(m, float("nan"))
            row[f"test {m}"] = res["test_r2"]["Acc"].get(m, float("nan"))
        row["selected embedding"] = res.get("selected", {}).get("Acc", "")
        for m in METHODS:
            mean, std = res["kfold_r2"]["Acc"].get(m, (float("nan"), float("nan")))
            row[f"kfold {m}"] = f"{mean:.3f} ± {std:.3f}"
        row["val_probe_r2"] = signal_curve(run_dir)
        row["pretrain_s"] = round(wall["pretrain_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    with (out / "ablation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    scored = [r for r in rows if r[f"val {SELECTED}"] == r[f"val {SELECTED}"]]  # not NaN
    if scored:
        best = max(scored, key=lambda r: r[f"val {SELECTED}"])
        md.append(f"\nChosen on validation: {best['variant']} (val R² {best[f'val {SELECTED}']:.3f}, "
                  f"test {best[f'test {SELECTED}']:.3f}, embedding {best['selected embedding']}).")
    (out / "ablation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
