"""Small image-classification tasks built from scikit-learn's digits (no download).

Zoo generation trains on them, and sampling uses them again for BN-conditioning and
fine-tuning, so a task is plain data: CPU tensors per split, nothing tied to Ray.

* ``digits``: 8x8 images, 10 classes.
* ``digits_transposed``: the same images transposed (a transfer task: same labels, spatially rearranged inputs).
* ``digits_permuted``: the same images with the labels relabelled by :data:`LABEL_PERMUTATION`
  (a transfer task: same features, new read-out).

All tasks share one deterministic, stratified 60/20/20 split (by ``split_seed``), so a
sample index is in the same split in every task. Pixels are scaled to [0, 1] and then
standardized with one mean and std computed on the training split (recorded on the task
as its :class:`Normalization`). Tasks from the user's own data: :mod:`sane_ray.zoo.task_sources`.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

# A fixed relabelling with no fixed point: label c becomes LABEL_PERMUTATION[c].
LABEL_PERMUTATION: tuple[int, ...] = (7, 3, 9, 0, 5, 1, 8, 2, 6, 4)
SPLIT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
DEFAULT_SPLIT_SEED = 0
TASK_SPLITS = ("train", "val", "test")  # a task's data splits (not a zoo's model splits, sane_ray.data.splits)


class UnknownTaskError(KeyError):
    """The task name is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


class TaskDataError(ValueError):
    """Task data that cannot be used; the message is one line naming the file or directory."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(line.strip() for line in message.splitlines()))


@dataclass(frozen=True)
class Normalization:
    """How stored pixels became inputs: ``x = (pixels / divisor - mean[c]) / std[c]`` per channel c.

    ``mean`` and ``std`` are empty when nothing was standardized; ``stats`` says where they
    came from: ``"none"``, ``"given"`` or ``"train"`` (computed on the training split).
    """

    divisor: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    stats: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, to write beside results."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Split:
    """Inputs ``x`` float32 (N, C, H, W) and labels ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Task:
    """A classification task: three disjoint splits, its class count, input shape (C, H, W) and normalization."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]
    normalization: Normalization = Normalization()

    def split(self, name: str) -> Split:
        if name not in TASK_SPLITS:
            raise ValueError(f"unknown split {name!r} of task {self.name!r}; use train, val or test")
        return getattr(self, name)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Raw digits images in [0, 1] as (N, 8, 8) float32 and labels (N,) int64 (read once per process)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=8)
def split_indices(split_seed: int = DEFAULT_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train/val/test sample indices (sorted) for the digits data set."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    idx = np.arange(len(labels))
    f_train, f_val, f_test = SPLIT_FRACTIONS
    train, rest = train_test_split(idx, train_size=f_train, stratify=labels, random_state=split_seed)
    val, test = train_test_split(
        rest, test_size=f_test / (f_val + f_test), stratify=labels[rest], random_state=split_seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def _build(name: str, images: np.ndarray, labels: np.ndarray, split_seed: int) -> Task:
    parts = split_indices(split_seed)
    mean = float(images[parts[0]].mean())
    std = float(images[parts[0]].std())
    x = torch.from_numpy((images - mean) / std).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(labels)
    train, val, test = (Split(x[i].contiguous(), y[i].contiguous()) for i in map(torch.from_numpy, parts))
    normalization = Normalization(divisor=16.0, mean=(mean,), std=(std,), stats="train")
    return Task(name, train, val, test, num_classes=10, input_shape=(1, 8, 8), normalization=normalization)


def _digits_task(split_seed: int) -> Task:
    images, labels = _digits()
    return _build("digits", images, labels, split_seed)


def _digits_transposed(split_seed: int) -> Task:
    images, labels = _digits()
    return _build("digits_transposed", np.ascontiguousarray(images.transpose(0, 2, 1)), labels, split_seed)


def _digits_permuted(split_seed: int) -> Task:
    images, labels = _digits()
    return _build("digits_permuted", images, np.asarray(LABEL_PERMUTATION)[labels], split_seed)


TASKS: dict[str, Callable[[int], Task]] = {
    "digits": _digits_task,
    "digits_transposed": _digits_transposed,
    "digits_permuted": _digits_permuted,
}


def get_task(name: str, split_seed: int = DEFAULT_SPLIT_SEED) -> Task:
    """Build registered task ``name`` (fresh tensors each call; the raw data is read once)."""
    try:
        builder = TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
    return builder(split_seed)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``split``, in eval mode, restoring the mode after."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    try:
        for start in range(0, len(split), batch_size):
            x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    finally:
        model.train(was_training)
    n = max(len(split), 1)
    return correct / n, loss / n
