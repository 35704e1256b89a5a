"""A user's own zoo and data, end to end: a public-layout zoo of 28x28 CNNs, its data as an image folder.

What a researcher with a modelzoos.cc-style MNIST zoo does, with the zoo and the images made
here (no download): ``make_zoo`` writes a public-layout zoo of ``cnn_mnist_public`` models on
``digits28`` (the digits upscaled to 28x28), this script writes that task's images as PNG
files in image-folder layout (``DIR/{train,val,test}/<class>/*.png``), then the two jobs run
as a user would call them::

    python jobs/pretrain.py --zoo OUT/zoo --out OUT/runs --name own
    python jobs/sample.py --run OUT/runs/own --prompts OUT/zoo --task OUT/images --task_normalize train

and the side-by-side table of the sampling summary is printed (best kept candidate, kept
candidates, prompts, from scratch, memorization baselines). ``--task_normalize train``
standardizes the PNGs' pixels with the folder's training-split statistics: what the zoo's
task did (``digits28``: pixels in [0, 1], one mean and std from train)::

    python bench/own_data.py --out /tmp/own --models 24 --epochs 8 --pretrain-epochs 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from sane_ray.zoo.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_image_folder(task_name: str, out: str) -> None:
    """The task's images as 8-bit PNGs, ``out/<split>/<class>/<index>.png`` (pixels back in [0, 255])."""
    task = get_task(task_name)
    norm = task.normalization
    mean, std = np.asarray(norm.mean or (0.0,)), np.asarray(norm.std or (1.0,))
    for split in ("train", "val", "test"):
        part = task.split(split)
        unit = part.x.numpy() * std[:, None, None] + mean[:, None, None]  # pixels / divisor: in [0, 1]
        images = np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)
        for i, (img, label) in enumerate(zip(images, part.y.tolist())):
            folder = os.path.join(out, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(os.path.join(folder, f"{i:05d}.png"))


def _run(cmd: list[str]) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=8, help="training epochs of each zoo model")
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    args = ap.parse_args()
    py, out = sys.executable, os.path.abspath(args.out)
    zoo, images, runs = os.path.join(out, "zoo"), os.path.join(out, "images"), os.path.join(out, "runs")
    times = {}
    if not os.path.exists(zoo):
        times["make-zoo"] = _run([py, "jobs/make_zoo.py", "--task", "digits28", "--arch", "cnn_mnist_public",
                                  "--format", "public", "--models", str(args.models), "--epochs", str(args.epochs),
                                  "--out", zoo])
    if not os.path.exists(images):
        t0 = time.perf_counter()
        write_image_folder("digits28", images + ".partial")
        os.rename(images + ".partial", images)
        times["image folder"] = time.perf_counter() - t0
    times["pretrain"] = _run([py, "jobs/pretrain.py", "--zoo", zoo, "--out", runs, "--name", "own",
                              "--epochs", str(args.pretrain_epochs)])
    times["sample"] = _run([py, "jobs/sample.py", "--run", os.path.join(runs, "own"), "--prompts", zoo,
                            "--task", images, "--task_normalize", "train", "--candidates", str(args.candidates),
                            "--keep", str(args.keep), "--finetune_epochs", str(args.finetune_epochs),
                            "--out", os.path.join(out, "sample")])
    with open(os.path.join(out, "sample", "summary.md")) as f:
        md = f.read()
    print("\n" + md.split("## Side by side")[1].split("\n## ")[0].join(["## Side by side", ""]))
    print("wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
