"""Tasks from data, not code: :func:`load_task` turns a ``--task`` string into a :class:`Task`.

Zoos are trained on a task and samples are scored on one; registering a task in code
(:mod:`sane_ray.zoo.tasks`) does not scale to users' own data, which comes in the forms
they already have. ``spec`` may be:

* a registered name (``digits``, ...): :func:`~sane_ray.zoo.tasks.get_task`, unchanged;
* an ``.npz`` file (local or ``s3://``) with ``x_train, y_train, [x_val, y_val,] x_test, y_test``;
* a directory: image folder, Hugging Face ``save_to_disk`` DatasetDict or Parquet files
  (:mod:`sane_ray.zoo.task_readers`);
* ``package.module:function`` returning a :class:`Task` or a mapping of those arrays.

A missing val split is carved from train (stratified, seeded). Shapes, class counts and
the :class:`Normalization` come from the data and are recorded on the task. Every bad
input fails here with one :class:`TaskDataError` line naming the file or directory, so a
job stops before it starts any expensive work.
"""

from __future__ import annotations

import importlib
import io
import logging
import re
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from sane_ray import storage
from sane_ray.zoo.task_readers import read_directory
from sane_ray.zoo.tasks import DEFAULT_SPLIT_SEED, NORMALIZE_MODES, TASK_SPLITS, TASKS, Normalization, Split, Task, TaskDataError, get_task

__all__ = ["ClassMismatch", "TaskDataError", "check_task", "load_task"]

log = logging.getLogger(__name__)

VAL_FRACTION = 0.2  # of train, carved off when the data has no val split
_ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class ClassMismatch:
    """The data has ``task_classes`` classes where the zoo's architecture has ``zoo_classes`` outputs."""

    task_classes: int
    zoo_classes: int


def load_task(spec: str, *, split_seed: int = DEFAULT_SPLIT_SEED, normalize: str = "auto",
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              s3: storage.S3Options | None = None, image_column: str | None = None,
              label_column: str | None = None, expect_shape: tuple[int, int, int] | None = None,
              expect_classes: int | None = None, allow_new_classes: bool = False) -> Task:
    """The task ``spec`` names (see the module docstring), checked against the zoo's shape and classes if given.

    ``normalize="auto"`` scales uint8 pixels to [0, 1] and takes float arrays as given;
    ``mean``/``std`` (per channel, or one value for all) are then applied. ``"train"``
    standardizes each channel with its mean and std on the training split.
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, not {normalize!r}")
    if (mean is None) != (std is None) or (normalize == "train" and mean is not None):
        raise ValueError("give mean and std together, and not with normalize='train'")
    if spec in TASKS:
        if normalize != "auto" or mean is not None:
            raise ValueError(f"registered task {spec!r} has its own normalization; normalize/mean/std are for data")
        task = get_task(spec, split_seed)
    else:
        task = _load_data(spec, split_seed, (normalize, mean, std), s3, image_column, label_column)
    check_task(task, expect_shape, expect_classes, spec, allow_new_classes=allow_new_classes)
    return task


def check_task(task: Task, input_shape: Sequence[int] | None, num_classes: int | None, source: str, *,
               allow_new_classes: bool = False) -> ClassMismatch | None:
    """Check ``task`` against an architecture's input shape (C, H, W) and class count (None: unchecked).

    A shape mismatch always raises :class:`TaskDataError`; a class-count mismatch raises
    unless ``allow_new_classes``, and is then returned (the caller re-initializes the head).
    """
    if input_shape is not None and tuple(task.input_shape) != tuple(input_shape):
        raise TaskDataError(f"{source}: inputs are {tuple(task.input_shape)} (C, H, W) but the zoo's "
                            f"architecture takes {tuple(input_shape)}")
    if num_classes is None or task.num_classes == num_classes:
        return None
    if not allow_new_classes:
        raise TaskDataError(f"{source}: {task.num_classes} classes but the zoo's architecture has "
                            f"{num_classes} outputs (allow new classes to re-initialize its head)")
    return ClassMismatch(task.num_classes, num_classes)


def _load_data(spec: str, split_seed: int, norm: tuple[str, Any, Any], s3: storage.S3Options | None,
               image_column: str | None, label_column: str | None) -> Task:
    """A task from an entry point, an .npz file or a directory."""
    num_classes = None
    if _ENTRY_POINT.fullmatch(spec):
        arrays = _call_entry_point(spec)
        if isinstance(arrays, Task):
            if norm != ("auto", None, None):
                raise ValueError(f"{spec} returned a Task with its own normalization; normalize/mean/std are for arrays")
            return arrays
    elif spec.lower().endswith(".npz"):
        arrays = _read_npz(spec, s3)
    elif not storage.exists(spec, s3):
        raise TaskDataError(f"{spec}: no such file or directory, and not a registered task "
                            f"({', '.join(sorted(TASKS))}) or package.module:function")
    else:
        arrays, num_classes = read_directory(spec, s3, image_column, label_column)
    return _build_task(spec, arrays, split_seed, *norm, num_classes=num_classes)


def _call_entry_point(spec: str) -> Task | Mapping[str, Any]:
    module_name, func_name = spec.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except ImportError as e:
        raise TaskDataError(f"{spec}: cannot import {module_name} ({e})") from None
    except AttributeError:
        raise TaskDataError(f"{spec}: module {module_name} has no {func_name}") from None
    result = func()
    if not isinstance(result, (Task, Mapping)):
        raise TaskDataError(f"{spec}: returned a {type(result).__name__}, not a Task or a mapping of "
                            "x_train, y_train, x_val, y_val, x_test, y_test")
    return result


def _read_npz(uri: str, s3: storage.S3Options | None) -> dict[str, np.ndarray]:
    try:
        data = storage.read_bytes(uri, s3)
    except storage.NotFoundError:
        raise TaskDataError(f"{uri}: no such file") from None
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise TaskDataError(f"{uri}: not a readable .npz file (no zip directory: truncated or another format)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, zlib.error) as e:
        raise TaskDataError(f"{uri}: not a readable .npz file ({type(e).__name__}: {e})") from None


def _build_task(name: str, arrays: Mapping[str, Any], split_seed: int = DEFAULT_SPLIT_SEED,
               normalize: str = "auto", mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               *, num_classes: int | None = None) -> Task:
    """A task from arrays ``x_train, y_train, [x_val, y_val,] x_test, y_test`` (and optionally ``num_classes``).

    ``x`` is float (N, C, H, W), or uint8 (N, H, W, C) or (N, H, W); ``num_classes`` defaults
    to the array's, else the training labels' maximum + 1.
    """
    has_val = "x_val" in arrays or "y_val" in arrays
    required = ["x_train", "y_train", *(["x_val", "y_val"] if has_val else []), "x_test", "y_test"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise TaskDataError(f"{name}: missing {', '.join(missing)} (need x_train, y_train, x_test, y_test; "
                            "x_val, y_val optional)")
    splits = {s: _split_arrays(name, s, arrays) for s in TASK_SPLITS if f"x_{s}" in arrays}
    _check_images(name, splits)
    declared = arrays.get("num_classes", num_classes)
    n_classes = _check_labels(name, splits, None if declared is None else int(declared))
    if "val" not in splits:
        splits["train"], splits["val"] = _carve_val(name, *splits["train"], split_seed)
    x, normalization = _normalize(name, {s: x for s, (x, _) in splits.items()}, normalize, mean, std)
    parts = {s: Split(x[s], torch.from_numpy(y)) for s, (_, y) in splits.items()}
    shape = tuple(int(d) for d in x["train"].shape[1:])
    return Task(name, parts["train"], parts["val"], parts["test"], n_classes, shape, normalization)


def _split_arrays(name: str, split: str, arrays: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One split's images as (N, C, H, W) in their dtype and its labels as int64, checked."""
    x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise TaskDataError(f"{name}: y_{split} must be 1-D integer labels, not {y.dtype} of shape {y.shape}")
    if len(x) != len(y):
        raise TaskDataError(f"{name}: x_{split} has {len(x)} samples but y_{split} has {len(y)}")
    if not len(y):
        raise TaskDataError(f"{name}: the {split} split is empty")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise TaskDataError(f"{name}: x_{split} is {x.dtype}; use float (N, C, H, W) or uint8 (N, H, W, C) or (N, H, W)")
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W): one channel
    elif x.ndim == 4 and x.dtype == np.uint8:
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C)
    elif x.ndim != 4:
        raise TaskDataError(f"{name}: x_{split} has shape {x.shape}; use (N, C, H, W), (N, H, W, C) or (N, H, W)")
    return x, y.astype(np.int64)


def _check_images(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    ref = splits["train"][0]
    for split, (x, _) in splits.items():
        if x.shape[1:] != ref.shape[1:]:
            raise TaskDataError(f"{name}: x_{split} images are {x.shape[1:]} (C, H, W) but x_train's are {ref.shape[1:]}")
        if (x.dtype == np.uint8) != (ref.dtype == np.uint8):
            raise TaskDataError(f"{name}: x_{split} is {x.dtype} but x_train is {ref.dtype}; use one kind for all")


def _check_labels(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int | None) -> int:
    """The class count (declared, else from train); every label must lie in [0, num_classes)."""
    n = num_classes if num_classes is not None else int(splits["train"][1].max()) + 1
    for split, (_, y) in splits.items():
        bad = y[(y < 0) | (y >= n)]
        if bad.size:
            raise TaskDataError(f"{name}: the {split} split has label {int(bad[0])} outside [0, {n})")
    return n


def _carve_val(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Split ``VAL_FRACTION`` of train off as val, stratified by class and seeded."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    sizes = _val_sizes(counts, rng)
    val = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, sizes)]))
    if not val.size:
        raise TaskDataError(f"{name}: no val split, and train ({len(y)} samples) is too small to carve one")
    train = np.setdiff1d(np.arange(len(y)), val)
    log.info("%s: no val split; carved %d of %d training samples (%.0f%%, stratified, seed %d)",
             name, len(val), len(y), 100 * VAL_FRACTION, seed)
    return (x[train], y[train]), (x[val], y[val])


def _val_sizes(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-class val sizes adding up to ``VAL_FRACTION`` of all samples (largest remainders, ties drawn
    at random), each class keeping at least one training sample."""
    share = counts * VAL_FRACTION
    sizes = np.floor(share).astype(np.int64)
    order = np.lexsort((rng.random(len(counts)), sizes - share))  # largest remainder first
    sizes[order[:int(round(share.sum())) - sizes.sum()]] += 1
    return np.minimum(sizes, counts - 1)


def _normalize(name: str, x: dict[str, np.ndarray], normalize: str, mean: Sequence[float] | None,
               std: Sequence[float] | None) -> tuple[dict[str, torch.Tensor], Normalization]:
    """float32 tensors per split: uint8 divided by 255, then standardized per channel as asked."""
    divisor = 255.0 if x["train"].dtype == np.uint8 else 1.0
    out = {s: torch.from_numpy(np.array(a, dtype=np.float32, order="C")) for s, a in x.items()}
    if divisor != 1.0:
        for t in out.values():
            t.div_(divisor)
    channels = out["train"].shape[1]
    if normalize == "train":
        mean = [float(out["train"][:, c].double().mean()) for c in range(channels)]
        std = [float(out["train"][:, c].double().std(correction=0)) for c in range(channels)]
    if mean is None:
        return out, Normalization(divisor=divisor)
    mean, std = (tuple(float(v) for v in (a if len(a) > 1 else list(a) * channels)) for a in (mean, std))
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need 1 or {channels} values (the images' channels) for {name}")
    if 0.0 in std:
        raise TaskDataError(f"{name}: channel {std.index(0.0)} has std 0 (a constant channel cannot be standardized)")
    m, s = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
    for t in out.values():
        t.sub_(m).div_(s)
    return out, Normalization(divisor, mean, std, "train" if normalize == "train" else "given")
