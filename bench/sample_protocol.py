"""The paper's sampling protocol on a digits zoo: sampling variants x seeds, one table.

Prerequisites (the closing note of issue 10 used these)::

    python jobs/make_zoo.py --out /tmp/zoo-sample --models 60 --epochs 20
    python jobs/pretrain.py --zoo /tmp/zoo-sample --out /tmp/runs-sample --name digits-half \\
        --data.epochs "[1,2,3,4,5,6,7,8,9,10]"          # the first half of the epochs
    python bench/sample_protocol.py --run /tmp/runs-sample/digits-half --prompt-epoch 10 --out /tmp/sample-protocol

Variants (each fine-tuned for ``--epochs`` epochs; prompts are the best 5 by validation
accuracy at the last pretraining epoch): subsampling (draw 50, keep 10), bootstrapping (+ refits),
KDE without subsampling (draw 10, keep 10), the Gaussian prior (with bootstrapping), and the
comparisons every run computes (fine-tuned prompts, training from scratch, taken from the
subsampling run). Finished runs are reused (``summary.json``), so the protocol can be run in
several shorter invocations. Prints and writes ``protocol.md`` / ``protocol.csv``: validation
accuracy of the kept models (the selection score), test accuracy at epochs 0, 1 and 5 and the
kept models' L2 to the nearest training model (novelty runs only), mean ± std over seeds (each
seed's value is the mean over its models), and the memorization baselines of the subsampling runs.

``--departures`` adds the paper's / reference's choice wherever sane-ray departs from it
(:data:`DEPARTURES`, each a dict of ``SampleConfig`` overrides of subsampling, plus one anchor per
token); ``--novelty-all`` computes novelty for every variant. The BN-conditioning row only differs
from subsampling on prompts with BatchNorm (``--prompts`` a ``cnn_digits_bn`` zoo)::

    python bench/sample_protocol.py --run RUN --prompt-epoch 10 --out OUT --epochs 1 --departures --novelty-all
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import re
import time

import numpy as np

from sane_ray.cluster import ensure_ray
from sane_ray.sample.config import SampleConfig
from sane_ray.sample.job import run_sample


def variants(args: argparse.Namespace) -> dict[str, dict]:
    base = {"candidates": 50, "keep": 10}
    out = {
        "subsampling": base,
        "bootstrapping": {**base, "bootstrap": args.bootstrap},
        "KDE w/o subsampling": {"candidates": 10, "keep": 10},
        "Gaussian prior": {**base, "mode": "gauss", "bootstrap": args.bootstrap},
    }
    if args.token_anchor or args.departures:
        out["subsampling, anchor per token"] = {**base, "kde_anchor": "token"}
    if args.departures:  # the paper's / reference's choice where sane-ray departs (subsampling is sane-ray's)
        out.update(DEPARTURES)
    return out


# Each departure from the paper as SampleConfig overrides of subsampling (50 -> 10); sane-ray's
# defaults are the "subsampling" row (bandwidth 0.05, one anchor per candidate, BN reset + exact
# average over 50 batches). The anchor-per-token row is "subsampling, anchor per token".
DEPARTURES = {
    "bandwidth 0.2 (paper)": {"candidates": 50, "keep": 10, "bandwidth": 0.2},
    "BN: reference (momentum 0.1, 200 batches)": {"candidates": 50, "keep": 10, "bn_momentum": 0.1, "bn_batches": 200},
    "Gaussian prior (no bootstrap)": {"candidates": 50, "keep": 10, "mode": "gauss"},
}


def _dir(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def _pm(x: np.ndarray) -> str:
    """mean ± std over seeds, n/a without values (e.g. no training model of the prompts' layout)."""
    return "n/a" if np.isnan(x).all() else f"{np.nanmean(x):.2f} ± {np.nanstd(x):.2f}"


def _mean(x: float | None) -> float:
    return math.nan if x is None else float(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--task", default="digits")
    p.add_argument("--prompts", default="")
    p.add_argument("--prompt-epoch", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=2)
    p.add_argument("--anchor", default="model", help="KDE anchor of the variants (token or model)")
    p.add_argument("--bandwidth", type=float, default=0.05, help="0: the bandwidth rule")
    p.add_argument("--token-anchor", action="store_true", help="also run subsampling with one anchor per token")
    p.add_argument("--departures", action="store_true",
                   help="also run the paper's choices where sane-ray departs (DEPARTURES, and anchor per token)")
    p.add_argument("--novelty-all", action="store_true",
                   help="novelty and memorization baselines for every variant (default: subsampling only)")
    p.add_argument("--no-halo", action="store_true")
    p.add_argument("--no-bn-cond", action="store_true")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants (e.g. subsampling)")
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ensure_ray(num_cpus=args.cpus)
    base = SampleConfig(run=args.run, prompts=args.prompts, task=args.task, prompt_epoch=args.prompt_epoch,
                        finetune_epochs=args.epochs, kde_anchor=args.anchor, bandwidth=args.bandwidth,
                        halo=0 if args.no_halo else None, bn_condition=not args.no_bn_cond)
    results: dict[str, list[list[float]]] = {}
    extra: dict[str, list[tuple[float, float]]] = {}  # variant -> per seed (kept val acc, L2 to nearest training model)
    memo: dict[str, list[dict]] = {}  # memorization table of the subsampling runs, per source per seed
    speed = []
    chosen = {k: v for k, v in variants(args).items() if args.only is None or k in args.only}
    if not chosen:
        raise SystemExit(f"--only matches no variant; known: {', '.join(variants(args))}")
    for seed in args.seeds:  # seed-major: an interrupted protocol still has every variant at the first seeds
        for name, over in chosen.items():
            t0 = time.perf_counter()
            cfg = dataclasses.replace(base, **over, seed=seed, novelty=args.novelty_all or name == "subsampling",
                                      out=os.path.join(args.out, _dir(name), f"s{seed}"))
            done = os.path.join(cfg.out, "summary.json")
            if os.path.exists(done):  # finished by an earlier invocation (runs resume)
                with open(done) as f:
                    s = json.load(f)
            else:
                s = run_sample(cfg)
            speed.append(s["candidates_per_s"])
            curves = s["curves"]
            results.setdefault(name, []).append(curves["sampled"]["mean"])
            sampled = s.get("memorization", {}).get("sampled", {})
            extra.setdefault(name, []).append((s["kept_val_acc"][0], _mean(sampled.get("nearest_train_l2", [None])[0])))
            if name == "subsampling":
                for source, v in s.get("memorization", {}).items():
                    memo.setdefault(source, []).append(v)
                results.setdefault("fine-tuned prompts", []).append(curves["prompt"]["mean"])
                results.setdefault("from scratch", []).append(curves["scratch"]["mean"])
                prompt = s.get("memorization", {}).get("prompt", {})
                extra.setdefault("fine-tuned prompts", []).append(
                    (float(np.mean([p["val_acc"] for p in s["prompts"]])), _mean(prompt.get("nearest_train_l2", [None])[0])))
                extra.setdefault("from scratch", []).append((math.nan, math.nan))  # scored on test only
            print(f"{name} seed {seed}: {[round(100 * a, 1) for a in curves['sampled']['mean']]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    shown = [e for e in (0, 1, 5) if e <= args.epochs]
    lines = ["| method | val acc (kept) | " + " | ".join(f"test acc epoch {e}" for e in shown)
             + " | L2 to nearest training model |", "|---|---|" + "---|" * len(shown) + "---|"]
    rows = []
    for name, per_seed in results.items():
        acc = 100 * np.asarray(per_seed)
        val = 100 * np.asarray([v for v, _ in extra[name]])
        l2 = np.asarray([d for _, d in extra[name]])
        dist = _pm(l2)
        cells = [f"{acc[:, e].mean():.1f} ± {acc[:, e].std():.1f}" for e in shown]
        vcell = "n/a" if np.isnan(val).all() else f"{val.mean():.1f} ± {val.std():.1f}"
        lines.append(f"| {name} | {vcell} | " + " | ".join(cells) + f" | {dist} |")
        rows.append([name, f"{val.mean():.2f}", *[f"{acc[:, e].mean():.2f}" for e in shown], f"{np.nanmean(l2):.3f}",
                     f"{val.std():.2f}", *[f"{acc[:, e].std():.2f}" for e in shown], f"{np.nanstd(l2):.3f}"])
    if memo:  # memorization baselines of the subsampling runs (sane_ray.sample.novelty)
        lines += ["", "| source (subsampling runs) | n per seed | val acc | test acc | L2 to nearest training model |",
                  "|---|---|---|---|---|"]
        for source, per_seed in memo.items():
            cell = {k: np.asarray([v[k][0] for v in per_seed]) for k in ("val_acc", "test_acc", "nearest_train_l2")}
            lines.append(f"| {source} | {per_seed[0]['n']} | {100 * cell['val_acc'].mean():.1f} ± "
                         f"{100 * cell['val_acc'].std():.1f} | {100 * cell['test_acc'].mean():.1f} ± "
                         f"{100 * cell['test_acc'].std():.1f} | {_pm(cell['nearest_train_l2'])} |")
    table = "\n".join(lines)
    note = (f"\nmean ± std over seeds {args.seeds} of each seed's mean over its models; KDE anchor per {args.anchor}, bandwidth {args.bandwidth or 'rule'}, "
            f"halo {not args.no_halo}, BN-cond {not args.no_bn_cond}; candidates/s per run "
            f"{min(speed):.2f}-{max(speed):.2f}\n")
    print(table + note)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "protocol.md"), "w") as f:
        f.write(table + "\n" + note)
    with open(os.path.join(args.out, "protocol.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "mean_val_acc", *[f"mean_epoch_{e}" for e in shown], "mean_nearest_train_l2",
                    "std_val_acc", *[f"std_epoch_{e}" for e in shown], "std_nearest_train_l2"])
        w.writerows(rows)


if __name__ == "__main__":
    main()
