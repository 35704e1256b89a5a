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
several shorter invocations. Prints and writes ``protocol.md`` / ``protocol.csv``: test accuracy at
epochs 0, 1 and 5, mean ± std over seeds (each seed's value is the mean over its models).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
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
    if args.token_anchor:
        out["subsampling, anchor per token"] = {**base, "kde_anchor": "token"}
    return out


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
    p.add_argument("--no-halo", action="store_true")
    p.add_argument("--no-bn-cond", action="store_true")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants (e.g. subsampling)")
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ensure_ray(num_cpus=args.cpus)
    base = SampleConfig(run=args.run, prompts=args.prompts, task=args.task, prompt_epoch=args.prompt_epoch,
                        finetune_epochs=args.epochs, kde_anchor=args.anchor, bandwidth=args.bandwidth,
                        halo=not args.no_halo, bn_condition=not args.no_bn_cond)
    results: dict[str, list[list[float]]] = {}
    speed = []
    chosen = {k: v for k, v in variants(args).items() if args.only is None or k in args.only}
    if not chosen:
        raise SystemExit(f"--only matches no variant; known: {', '.join(variants(args))}")
    for name, over in chosen.items():
        for seed in args.seeds:
            t0 = time.perf_counter()
            cfg = dataclasses.replace(base, **over, seed=seed, novelty=name == "subsampling",
                                      out=os.path.join(args.out, name.replace(" ", "_").replace(",", ""), f"s{seed}"))
            done = os.path.join(cfg.out, "summary.json")
            if os.path.exists(done):  # finished by an earlier invocation (runs resume)
                with open(done) as f:
                    s = json.load(f)
            else:
                s = run_sample(cfg)
            speed.append(s["candidates_per_s"])
            curves = s["curves"]
            results.setdefault(name, []).append(curves["sampled"]["mean"])
            if name == "subsampling":
                results.setdefault("fine-tuned prompts", []).append(curves["prompt"]["mean"])
                results.setdefault("from scratch", []).append(curves["scratch"]["mean"])
            print(f"{name} seed {seed}: {[round(100 * a, 1) for a in curves['sampled']['mean']]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    shown = [e for e in (0, 1, 5) if e <= args.epochs]
    lines = ["| method | " + " | ".join(f"epoch {e}" for e in shown) + " |", "|---|" + "---|" * len(shown)]
    rows = []
    for name, per_seed in results.items():
        acc = 100 * np.asarray(per_seed)
        cells = [f"{acc[:, e].mean():.1f} ± {acc[:, e].std():.1f}" for e in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        rows.append([name, *[f"{acc[:, e].mean():.2f}" for e in shown], *[f"{acc[:, e].std():.2f}" for e in shown]])
    table = "\n".join(lines)
    note = (f"\nseeds {args.seeds}, KDE anchor per {args.anchor}, bandwidth {args.bandwidth or 'rule'}, "
            f"halo {not args.no_halo}, BN-cond {not args.no_bn_cond}; candidates/s per run "
            f"{min(speed):.2f}-{max(speed):.2f}\n")
    print(table + note)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "protocol.md"), "w") as f:
        f.write(table + "\n" + note)
    with open(os.path.join(args.out, "protocol.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", *[f"mean_epoch_{e}" for e in shown], *[f"std_epoch_{e}" for e in shown]])
        w.writerows(rows)


if __name__ == "__main__":
    main()
