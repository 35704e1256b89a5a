"""Time a few of a zoo's models, trained as ``make-zoo`` trains each (``train_model``: one thread,
checkpoints and metrics per epoch), without Ray: per-model seconds and test accuracy by epoch.

Sizes a zoo before generating it: ``models x seconds / cores`` is its training time on idle
cores (plus Ray start-up, about 10 s). Example (the ResNet zoo of README.md)::

    python bench/bench_zoo_models.py --task digits32_rgb --arch resnet18 --epochs 5 --lr 2e-3 1e-2 --first 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.plan import ZooGenConfig, plan_models
from sane_ray.zoo.tasks import get_task
from sane_ray.zoo.trainer import train_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="digits")
    ap.add_argument("--arch", default="cnn_digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=ZooGenConfig.width)
    ap.add_argument("--batch-size", type=int, default=ZooGenConfig.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, nargs=2, metavar=("LOW", "HIGH"), help="space.lr (default: make-zoo's)")
    ap.add_argument("--first", type=int, default=2, help="train models 0 .. FIRST-1 of the zoo's plans")
    args = ap.parse_args()

    cfg = ZooGenConfig(task=args.task, arch=args.arch, epochs=args.epochs, width=args.width,
                       batch_size=args.batch_size, seed=args.seed, models=args.first)
    if args.lr:
        cfg.space.lr = list(args.lr)
    t0 = time.perf_counter()
    task = get_task(cfg.task, cfg.split_seed)  # the first build in this process, as on the make-zoo driver
    print(f"task {cfg.task} built in {time.perf_counter() - t0:.2f} s; 1-min load {os.getloadavg()[0]:.1f}")
    cfg.validate()
    seconds, finals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in plan_models(cfg):
            params = sum(p.numel() for p in build_model(plan.arch, **plan.arch_kwargs).parameters())
            t = time.perf_counter()
            rows = train_model(plan, task, tmp)
            seconds.append(time.perf_counter() - t)
            finals.append(rows[-1]["test_acc"])
            h = plan.hparams
            print(f"{plan.model_id}: {seconds[-1]:5.1f} s, {params:,} params, lr {h['lr']:.3g} wd {h['weight_decay']:g} "
                  f"init {h['init']} {plan.arch_kwargs}; test acc by epoch "
                  + " ".join(f"{r['test_acc']:.3f}" for r in rows))
    print(f"per model: median {statistics.median(seconds):.1f} s (min {min(seconds):.1f}, max {max(seconds):.1f}); "
          f"final test acc min {min(finals):.3f} median {statistics.median(finals):.3f} max {max(finals):.3f}; "
          f"1-min load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
