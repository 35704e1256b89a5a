"""Small image-classification tasks built from scikit-learn's digits (no download).

Zoo generation trains on them, and sampling uses them again for BN-conditioning and
fine-tuning, so a task is plain data: CPU tensors per split, nothing tied to Ray.

* ``digits``: 8x8 images, 10 classes.
* ``digits_transposed``: the same images transposed (a transfer task: same labels, spatially rearranged inputs).
* ``digits_permuted``: the same images with the labels relabelled by :data:`LABEL_PERMUTATION`
  (a transfer task: same features, new read-out).
* ``digits28``: the same digits upscaled bilinearly to 28x28 (MNIST's size, one channel).
* ``digits32_rgb``: the same digits as 32x32 RGB images, for ResNet-scale zoos trained on CPUs:
  each image is upscaled bilinearly to 32x32, shifted by up to :data:`RGB_MAX_SHIFT` pixels,
  and drawn as a coloured digit on a coloured background with Gaussian pixel noise. Shift,
  colours and noise come from a generator seeded by ``(split_seed, image index)``, so the task
  is deterministic and an image does not depend on any other. One colour is dark and one light
  (every channel within :data:`RGB_TONE` of 0 or of 1), and a coin flip picks which is the
  digit's: the digit stays readable (a small CNN reaches ~90% test accuracy) while colours and
  polarity vary per image, so a model must learn shapes.

All tasks share one deterministic, stratified 60/20/20 split (by ``split_seed``), so a
sample index is in the same split in every task. Pixels are scaled to [0, 1] and then
standardized on the training split: the 8x8 tasks with one mean and std, ``digits32_rgb``
with a mean and std per channel (recorded on the task as its :class:`Normalization`). Tasks
from the user's own data: :mod:`sane_ray.zoo.task_sources`.
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
NORMALIZE_MODES = ("auto", "train")  # files: auto scales uint8 to [0, 1]; train also standardizes per channel
TASK_SPLITS = ("train", "val", "test")  # a task's data splits (not a zoo's model splits, sane_ray.data.splits)
# digits32_rgb: image side, largest shift per axis (pixels), how far a dark (light) colour's channels
# lie from 0 (1), and the std of the pixel noise (all on the [0, 1] scale).
RGB_SIZE = 32
RGB_MAX_SHIFT = 3
RGB_TONE = 0.35
RGB_NOISE_STD = 0.1


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


def _upscaled_digits(size: int) -> np.ndarray:
    """The digits as (N, size, size) intensities in [0, 1], upscaled bilinearly (pixel centres aligned)."""
    images, _ = _digits()
    up = nn.functional.interpolate(torch.from_numpy(images).unsqueeze(1), size=(size, size),
                                   mode="bilinear", align_corners=False)
    return up.squeeze(1).clamp_(0.0, 1.0).numpy()


def _rgb_draws(split_seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: shift (N, 2) in [0, 2 * RGB_MAX_SHIFT], background and foreground colours (N, 3),
    noise (N, 3, 32, 32). Image ``i``'s draws come from its own Philox stream keyed by ``(split_seed, i)``
    (counter-based: distinct keys give independent streams, and one is 5x cheaper to set up than a
    SeedSequence-seeded generator)."""
    shift = np.empty((n, 2), np.int64)
    tones = np.empty((n, 2, 3), np.float32)
    light_digit = np.empty((n, 1), bool)
    noise = np.empty((n, 3, RGB_SIZE, RGB_SIZE), np.float32)
    for i in range(n):
        rng = np.random.Generator(np.random.Philox(key=(split_seed << 64) | i))
        shift[i] = rng.integers(0, 2 * RGB_MAX_SHIFT + 1, size=2)
        tones[i] = rng.random((2, 3))
        light_digit[i] = rng.random() < 0.5
        noise[i] = rng.standard_normal((3, RGB_SIZE, RGB_SIZE), dtype=np.float32)
    dark, light = RGB_TONE * tones[:, 0], 1 - RGB_TONE * tones[:, 1]
    background, foreground = np.where(light_digit, dark, light), np.where(light_digit, light, dark)
    return shift, background, foreground, noise * RGB_NOISE_STD


@functools.lru_cache(maxsize=8)
def _digits32_rgb_images(split_seed: int) -> np.ndarray:
    """digits32_rgb's raw images, (N, 3, 32, 32) float32 in [0, 1] (built once per process and split seed)."""
    up = _upscaled_digits(RGB_SIZE)
    n = len(up)
    shift, background, foreground, noise = _rgb_draws(split_seed, n)
    # Shift by cropping a zero-padded canvas at a per-image offset (0..2*RGB_MAX_SHIFT per axis).
    padded = np.pad(up, ((0, 0), (RGB_MAX_SHIFT, RGB_MAX_SHIFT), (RGB_MAX_SHIFT, RGB_MAX_SHIFT)))
    pixels = np.arange(RGB_SIZE)
    rows = (shift[:, 0, None] + pixels)[:, :, None]
    cols = (shift[:, 1, None] + pixels)[:, None, :]
    mask = padded[np.arange(n)[:, None, None], rows, cols][:, None]  # (N, 1, 32, 32)
    colour = background[:, :, None, None] * (1 - mask) + foreground[:, :, None, None] * mask
    return np.clip(colour + noise, 0.0, 1.0).astype(np.float32)


def _per_channel(name: str, images: np.ndarray, split_seed: int) -> Task:
    """A task of (N, C, H, W) intensities in [0, 1], standardized per channel with the training split's
    mean and std (the digits' split and labels)."""
    _, labels = _digits()
    parts = split_indices(split_seed)
    train = images[parts[0]]
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    x = torch.from_numpy(((images - mean) / std).astype(np.float32))
    y = torch.from_numpy(labels)
    train_s, val_s, test_s = (Split(x[i].contiguous(), y[i].contiguous()) for i in map(torch.from_numpy, parts))
    norm = Normalization(1.0, tuple(float(v) for v in mean.ravel()), tuple(float(v) for v in std.ravel()), "train")
    return Task(name, train_s, val_s, test_s, num_classes=10, input_shape=tuple(images.shape[1:]),  # type: ignore[arg-type]
                normalization=norm)


def _digits28(split_seed: int) -> Task:
    return _per_channel("digits28", _upscaled_digits(28)[:, None], split_seed)


def _digits32_rgb(split_seed: int) -> Task:
    return _per_channel("digits32_rgb", _digits32_rgb_images(split_seed), split_seed)


# The 8x8 grayscale tasks share one input shape, so a zoo on one transfers to the others.
DIGITS8_TASKS = ("digits", "digits_transposed", "digits_permuted")
TASKS: dict[str, Callable[[int], Task]] = {
    "digits": _digits_task,
    "digits_transposed": _digits_transposed,
    "digits_permuted": _digits_permuted,
    "digits28": _digits28,  # MNIST-sized (1x28x28): public-layout MNIST CNNs (cnn_mnist_public)
    "digits32_rgb": _digits32_rgb,  # CIFAR-sized (3x32x32): ResNet-scale zoos on CPUs
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
