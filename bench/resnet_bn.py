"""BN-conditioning on a ResNet zoo: sampled ResNet-18s without and with it, fine-tuned, against from scratch.

The zoo (narrow CIFAR ResNet-18s on ``digits32_rgb``), a CPU-sized SANE pretrained on it, and two
sampling jobs that differ only in ``bn_condition``; each fine-tunes its kept candidates, the
prompts and as many from-scratch models for ``--finetune-epochs``. Sampled BatchNorm networks
carry no running statistics (the tokens hold weights only), so without conditioning they should
be near chance (paper: ResNet-18 10% zero-shot, 61% with BN-conditioning)::

    python bench/resnet_bn.py --out /tmp/rbn --models 32 --epochs 5 --pretrain-epochs 10

``jobs/probe.py`` also embeds the zoo with the run and fits the linear probes (``OUT/probe``),
so the one zoo goes through all four released jobs. Writes ``OUT/bn_table.md`` and prints it:
test accuracy (%) at fine-tuning epochs 0, 1 and the last, mean ± std over models, per group
of each job; then the probe's test-split R² per target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {"sampled": "sampled (kept)", "prompt": "prompts", "scratch": "from scratch"}


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _cells(curve: dict, epochs: list[int]) -> list[str]:
    return [f"{100 * curve['mean'][e]:.1f} ± {100 * curve['std'][e]:.1f}" for e in epochs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5, help="training epochs of each zoo model")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--windows-per-checkpoint", type=int, default=60)
    ap.add_argument("--candidates", type=int, default=30)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    args = ap.parse_args()
    py, out = sys.executable, os.path.abspath(args.out)
    zoo, runs = os.path.join(out, "zoo"), os.path.join(out, "runs")
    run = os.path.join(runs, "rbn")
    times = {}
    if not os.path.exists(os.path.join(zoo, "manifest.parquet")):
        times["make-zoo"] = _run([py, "jobs/make_zoo.py", "--task", "digits32_rgb", "--arch", "resnet18",
                                  "--width", str(args.width), "--models", str(args.models), "--epochs",
                                  str(args.epochs), "--space.lr", "[2e-3, 1e-2]", "--out", zoo])
    later = json.dumps(list(range(max(1, args.epochs - 2), args.epochs + 1)))  # the trained checkpoints
    if not os.path.exists(os.path.join(run, "model.safetensors")):
        times["pretrain"] = _run([py, "jobs/pretrain.py", "--zoo", zoo, "--out", runs, "--name", "rbn",
                                  "--epochs", str(args.pretrain_epochs), "--window", str(args.window),
                                  "--data.epochs", later,
                                  "--data.windows_per_model_epoch", str(args.windows_per_checkpoint),
                                  "--train.model.max_positions", "[8192, 64, 1024]"])
    probe = os.path.join(out, "probe")
    if not os.path.exists(os.path.join(probe, "results.json")):
        times["probe"] = _run([py, "jobs/probe.py", "--run", run, "--out", probe])
    summaries = {}
    for bn in (False, True):
        name = "bn-cond" if bn else "no-bn-cond"
        job = os.path.join(out, name)
        if not os.path.exists(os.path.join(job, "summary.json")):
            times[name] = _run([py, "jobs/sample.py", "--run", run, "--candidates", str(args.candidates),
                                "--keep", str(args.keep), "--finetune_epochs", str(args.finetune_epochs),
                                "--bn_condition", str(bn).lower(), "--prompt_epoch", str(args.epochs),
                                "--out", job])
        with open(os.path.join(job, "summary.json")) as f:
            summaries[name] = json.load(f)
    epochs = sorted({0, 1, args.finetune_epochs})
    lines = ["| job | models | n | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|---|---|---|" + "---|" * len(epochs)]
    for name, s in summaries.items():
        for group, curve in s["curves"].items():
            lines.append(f"| {name} | {LABELS.get(group, group)} | {curve['n']} | " + " | ".join(_cells(curve, epochs)) + " |")
    with open(os.path.join(probe, "results.json")) as f:
        r2 = json.load(f)["test_r2"]
    cols = list(next(iter(r2.values())))
    lines += ["", "| probe test R² | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {target} | " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |"
              for target, row in r2.items()]
    table = "\n".join(lines)
    with open(os.path.join(out, "bn_table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
