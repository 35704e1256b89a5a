"""One SANE over several architectures, against one SANE per architecture, on the same test models.

Writes (through the released jobs, as a user would run them):

1. ``make_zoo --arch A,B,C,D``: a mixed digits zoo, model i of architecture i mod 4, and a zoo of
   the held-out architecture (never pretrained on) for the transfer rows;
2. one subset zoo per architecture: the mixed zoo's models of that architecture, same ids and
   bytes (splits are per architecture, so each subset splits exactly as the mixed zoo does);
3. ``pretrain`` on the mixed zoo (windows balanced per architecture, per-token loss) and on
   every subset with the same settings;
4. ``probe`` of the mixed run on the mixed zoo (per-architecture tables) and of every
   single-architecture run on its subset: test-accuracy R² side by side, test models checked equal;
5. ``sample`` with the mixed run for every architecture (prompts of that architecture) and for
   the held-out one: zero-shot and fine-tuned accuracy of the kept candidates against the
   prompts and models trained from scratch.

Prints two Markdown tables and writes them to ``OUT/mixed_zoo.md``::

    python bench/mixed_zoo.py --out /tmp/mixed --models 64 --epochs 8 --pretrain-epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from sane_ray import storage
from sane_ray.zoo import native
from sane_ray.zoo.reader import load_checkpoint, open_zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def subset_zoo(src: str, dst: str, arch: str) -> None:
    """A native zoo of ``src``'s models of ``arch``: same ids, tensors, metrics and hyperparameters."""
    if storage.exists(storage.join(dst, native.MANIFEST)):
        return
    zoo, rows = open_zoo(src), []
    for m in (m for m in zoo.models if m.architecture == arch):
        for c in m.checkpoints:
            rows.append(native.write_checkpoint(dst, m.model_id, c.epoch, load_checkpoint(m, c), c.metrics,
                                                m.architecture, m.arch_kwargs, m.hparams))
    native.publish_manifest(dst, rows, {**zoo.metadata, "subset_of": src, "architecture": arch})


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def probe_rows(out: str, archs: list[str], runs: str) -> list[str]:
    """Per architecture: W, s(W), SANE of the mixed run's own tables; the pooled probe; the single run's SANE."""
    mixed = _json(os.path.join(out, "probe-mixed", "results.json"))
    lines = ["| architecture | W | s(W) | SANE, mixed run | SANE, mixed run, pooled probe | SANE, this architecture alone |"
             " test models |", "|---" * 7 + "|"]
    for a in archs:
        own = mixed["architectures"][a]
        alone = _json(os.path.join(out, f"probe-{a}", "results.json"))
        mixed_arch = _json(os.path.join(out, "probe-mixed", "arch", a, "results.json"))
        same = mixed_arch["test_models"] == alone["test_models"]
        assert same, f"{a}: the two probes test on different models"
        cells = [own["W"], own["s(W)"], own["SANE (selected on val)"], own["SANE, pooled probe"],
                 alone["test_r2"]["Acc"]["SANE (selected on val)"]]
        lines.append(f"| {a} | " + " | ".join(f"{v:.3f}" for v in cells) + f" | {len(alone['test_models'])} |")
    return lines


def sample_rows(out: str, targets: list[tuple[str, str]]) -> list[str]:
    lines = ["| target architecture | pretrained on it | kept, zero-shot | kept, fine-tuned | prompts, zero-shot |"
             " prompts, fine-tuned | from scratch, fine-tuned |", "|---" * 7 + "|"]
    for arch, seen in targets:
        s = _json(os.path.join(out, f"sample-{arch}", "summary.json"))
        c = s["curves"]

        def cell(group: str, at: int) -> str:
            m, sd = c[group]["mean"][at], c[group]["std"][at]
            return f"{100 * m:.1f} ± {100 * sd:.1f}"

        lines.append(f"| {arch} | {seen} | {cell('sampled', 0)} | {cell('sampled', -1)} | {cell('prompt', 0)} | "
                     f"{cell('prompt', -1)} | {cell('scratch', -1)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work directory (zoos, runs, probes, samples)")
    ap.add_argument("--archs", default="cnn_digits,mlp_digits,resnet_digits,vit_digits",
                    help="architectures of the mixed zoo")
    ap.add_argument("--held-out", default="cnn_digits_wide", help="architecture sampled but never pretrained on")
    ap.add_argument("--models", type=int, default=64, help="models of the mixed zoo (split evenly)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs of each zoo model")
    ap.add_argument("--width", type=int, default=4, help="resnet_digits width")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--pretrain-args", default="", help="more pretrain flags for every run (one string)")
    ap.add_argument("--candidates", type=int, default=30)
    ap.add_argument("--keep", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--no-sample", action="store_true", help="stop after the probes")
    args = ap.parse_args()
    py, out = sys.executable, os.path.abspath(args.out)
    archs = args.archs.split(",")
    zoo, held, runs = os.path.join(out, "zoo"), os.path.join(out, "zoo-held-out"), os.path.join(out, "runs")
    times: dict[str, float] = {}
    for uri, cmd in ((zoo, ["--arch", args.archs, "--models", str(args.models)]),
                     (held, ["--arch", args.held_out, "--models", str(max(8, args.models // len(archs))), "--seed", "1"])):
        if not os.path.exists(os.path.join(uri, native.MANIFEST)):
            times[f"make-zoo {os.path.basename(uri)}"] = _run(
                [py, "jobs/make_zoo.py", *cmd, "--epochs", str(args.epochs), "--width", str(args.width), "--out", uri])
    pre = ["--epochs", str(args.pretrain_epochs), "--train.model.reconstruction_norm", "token",
           *args.pretrain_args.split()]
    for name, uri in [("mixed", zoo)] + [(a, os.path.join(out, f"zoo-{a}")) for a in archs]:
        if name != "mixed":
            subset_zoo(zoo, uri, name)
        if not os.path.exists(os.path.join(runs, name, "summary.md")):
            times[f"pretrain {name}"] = _run([py, "jobs/pretrain.py", "--zoo", uri, "--out", runs, "--name", name, *pre])
        times[f"probe {name}"] = _run([py, "jobs/probe.py", "--run", os.path.join(runs, name), "--zoo", uri,
                                       "--out", os.path.join(out, f"probe-{name}")])
    targets = [] if args.no_sample else [(a, "yes") for a in archs] + [(args.held_out, "no")]
    for arch, seen in targets:
        prompts = ["--prompts", zoo, "--prompt-architecture", arch] if seen == "yes" else ["--prompts", held]
        times[f"sample {arch}"] = _run([py, "jobs/sample.py", "--run", os.path.join(runs, "mixed"), *prompts,
                                        "--candidates", str(args.candidates), "--keep", str(args.keep),
                                        "--finetune_epochs", str(args.finetune_epochs),
                                        "--out", os.path.join(out, f"sample-{arch}")])
    md = ["## Test-accuracy R² per architecture (linear probes, test split)", "", *probe_rows(out, archs, runs), "",
          *(["## Sampling with the mixed run (test accuracy %, kept candidates / prompts / from scratch)", "",
             *sample_rows(out, targets), ""] if targets else []), "wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "mixed_zoo.md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
