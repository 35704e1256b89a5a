"""What a generated zoo holds, fixed before any training: its config, the search space of
per-model hyperparameters, and each model's plan drawn from ``(seed, model index)`` alone.

The driver validates and plans here; :mod:`sane_ray.zoo.trainer` trains one plan wherever
Ray runs it, and :mod:`sane_ray.zoo.generate` fans the plans out and publishes the zoo.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, get_args

import numpy as np
import torch
from torch import nn

from sane_ray import storage
from sane_ray.config import to_dict
from sane_ray.zoo.architectures import ACTIVATIONS, ARCHITECTURES, arguments, get_architecture, input_shape
from sane_ray.zoo.tasks import DEFAULT_SPLIT_SEED, get_task

# Bump when training changes in a way that changes checkpoints: cached zoos then regenerate.
GENERATOR_VERSION = 2

ZooFormat = Literal["native", "public"]


def _uniform_init(w: torch.Tensor) -> None:
    nn.init.uniform_(w, -0.3, 0.3)


def _normal_init(w: torch.Tensor) -> None:
    nn.init.normal_(w, 0.0, 0.2)


# Weight initializations (biases start at zero); "default" keeps PyTorch's layer init.
INITS: dict[str, Callable[[torch.Tensor], Any] | None] = {
    "default": None,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "uniform": _uniform_init,
    "normal": _normal_init,
}


@dataclass
class SearchSpace:
    """What varies per model: ``lr`` is a log-uniform range [low, high], the rest are choices."""

    lr: list[float] = field(default_factory=lambda: [5e-4, 1e-2])
    """Adam learning rate: [low, high], drawn log-uniformly per model."""
    weight_decay: list[float] = field(default_factory=lambda: [0.0, 1e-4, 1e-3])
    """Adam weight decay: one value picked per model."""
    activation: list[str] = field(default_factory=lambda: ["relu", "tanh", "gelu", "sigmoid", "silu", "leakyrelu"])
    """Hidden-layer activation: one picked per model (architectures that take one; ResNets keep ReLU)."""
    init: list[str] = field(default_factory=lambda: list(INITS))
    """Weight initialization: one picked per model ("default" keeps PyTorch's layer init; the others zero biases)."""
    dropout: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2])
    """Dropout rate: one picked per model (architectures that take one; ResNets have none)."""


@dataclass
class ZooGenConfig:
    """How to generate one zoo. ``out`` defaults to a cache directory named after the config."""

    out: str | None = None
    """Where the zoo is written (path or s3://); null: <cache>/zoos/<task>-<arch>-<models>x<epochs>-s<seed>."""
    task: str = "digits"
    """The task every model trains on (sane_ray.zoo.tasks): digits, digits_transposed, digits_permuted
    (8x8 grayscale), digits28 (28x28 grayscale) or digits32_rgb (32x32 RGB)."""
    arch: str = "cnn_digits"
    """Architecture of the models, one taking the task's input shape: cnn_digits, cnn_digits_bn,
    cnn_digits_wide, mlp_digits, resnet_digits or vit_digits (8x8 tasks); cnn_mnist_public (digits28);
    resnet18, resnet34 or cnn_cifar_public (digits32_rgb). Several, comma-separated
    (cnn_digits,mlp_digits,vit_digits): a mixed zoo, model i gets the (i mod n)-th."""
    models: int = 48
    """Models in the zoo, one Ray task each."""
    epochs: int = 10
    """Training epochs per model; a checkpoint is stored after each, plus epoch 0 (the initialization)."""
    seed: int = 0
    """Each model's seed and hyperparameters are drawn from (seed, model index): same seed, same zoo."""
    batch_size: int = 32
    """Training batch size of every model."""
    split_seed: int = DEFAULT_SPLIT_SEED
    """The task's stratified train/val/test split of the digits images (shared by all tasks); it also
    seeds digits32_rgb's per-image shifts, colours and noise."""
    overwrite: bool = False
    """Replace a zoo already published at the zoo's location; false: refuse to."""
    format: ZooFormat = "native"
    """The layout written: native (safetensors + manifest) or public (modelzoos.cc)."""
    width: int = 8
    """ResNet width (channels of the first stage; resnet18 at 8: 176k parameters); ignored by other architectures."""
    space: SearchSpace = field(default_factory=SearchSpace)
    node_types: bool = False
    """Train the models on nodes declaring sane_cpu_node (sane_ray.cluster, cluster/); false: anywhere."""

    def validate(self) -> None:
        """Fail on the driver, before any task starts, naming the bad setting."""
        shape = get_task(self.task, self.split_seed).input_shape
        for arch in self.architectures:
            get_architecture(arch)  # unknown names get the registry's error
            _check_input_shape(arch, self.task, shape)
        if self.format not in get_args(ZooFormat):
            raise ValueError(f"format must be one of {', '.join(get_args(ZooFormat))}, got {self.format!r}")
        if self.format == "public" and self.out and storage.parse_uri(self.out).scheme == "s3":
            raise ValueError(
                "format public cannot be written to S3: the layout has no manifest to publish last and S3 "
                "has no rename, so an interrupted write would leave a partial zoo that readers trust; "
                "write it to a local or shared filesystem, or use format native on S3")
        for name in ("models", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        lo_hi = self.space.lr
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"space.lr must be [low, high] with 0 < low <= high, got {lo_hi}")
        for name in ("weight_decay", "activation", "init", "dropout"):
            if not getattr(self.space, name):
                raise ValueError(f"space.{name} must not be empty")
        unknown = sorted(set(self.space.init) - set(INITS))
        if unknown:
            raise ValueError(f"unknown init {unknown[0]!r} in space.init; known: {', '.join(INITS)}")
        unknown = sorted({a.lower() for a in self.space.activation} - set(ACTIVATIONS))
        if unknown:
            raise ValueError(f"unknown activation {unknown[0]!r} in space.activation; known: {', '.join(ACTIVATIONS)}")

    @property
    def architectures(self) -> list[str]:
        """The architectures of ``arch``, in the order models take them round-robin."""
        names = [a.strip() for a in self.arch.split(",")]
        if not all(names) or len(set(names)) < len(names):
            raise ValueError(f"arch must name distinct architectures separated by commas, got {self.arch!r}")
        return names

    def identity(self) -> dict[str, Any]:
        """The settings that determine the zoo's contents (not its layout, where it goes or runs, or overwrite)."""
        d = to_dict(self)
        del d["out"], d["overwrite"], d["format"], d["node_types"]
        if not any("width" in arguments(a) for a in self.architectures):  # so zoos generated before the field existed keep their identity
            del d["width"]
        return {"generator_version": GENERATOR_VERSION, **d}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _check_input_shape(arch: str, task: str, task_shape: tuple[int, ...]) -> None:
    """Refuse an architecture whose input is not the task's (C, H, W), naming those that fit."""
    shape = tuple(input_shape(arch))
    if shape == tuple(task_shape):
        return
    fits = [a for a in ARCHITECTURES if tuple(input_shape(a)) == tuple(task_shape)]
    raise ValueError(f"arch {arch!r} takes {_dims(shape)} inputs but task {task!r} has {_dims(task_shape)}; "
                     f"architectures for {_dims(task_shape)}: {', '.join(fits) or 'none registered'}")


def zoo_uri(cfg: ZooGenConfig) -> str:
    """Where ``cfg``'s zoo goes: ``cfg.out``, else ``<cache>/zoos/<task>-<arch>-<models>x<epochs>-s<seed>``
    (with ``-public`` appended for the public layout)."""
    if cfg.out:
        return storage.parse_uri(cfg.out).uri
    name = f"{cfg.task}-{'+'.join(cfg.architectures)}-{cfg.models}x{cfg.epochs}-s{cfg.seed}" + ("-public" if cfg.format == "public" else "")
    return os.path.join(storage.cache_dir(), "zoos", name)


@dataclass(frozen=True)
class ModelPlan:
    """Everything one task needs to train one model, fixed on the driver."""

    model_id: str
    seed: int
    task: str
    split_seed: int
    arch: str
    arch_kwargs: dict[str, Any]
    hparams: dict[str, Any]
    epochs: int
    batch_size: int


def _arch_kwargs(arch: str, num_classes: int, width: int, activation: str, dropout: float) -> dict[str, Any]:
    """One model's architecture arguments: the task's class count, and of the drawn activation and
    dropout and the config's width those that ``arch`` takes (a ResNet takes only the width)."""
    offered = {"activation": activation, "dropout": float(dropout), "width": width}
    return {**{k: v for k, v in offered.items() if k in arguments(arch)}, "num_classes": num_classes}


def plan_models(cfg: ZooGenConfig) -> list[ModelPlan]:
    """Draw each model's seed and hyperparameters from ``(cfg.seed, index)`` alone.

    Every model draws an activation and a dropout rate, whether or not its architecture
    takes them, so a model's other draws do not depend on the architecture (nor on the
    other architectures of a mixed zoo: model i takes architecture i mod n).
    """
    plans = []
    sp = cfg.space
    archs = cfg.architectures
    num_classes = get_task(cfg.task, cfg.split_seed).num_classes
    for i in range(cfg.models):
        rng = np.random.default_rng([cfg.seed, i])
        seed = int(rng.integers(2**31 - 1))
        lr = float(f"{math.exp(rng.uniform(math.log(sp.lr[0]), math.log(sp.lr[1]))):.3g}")
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        wd, act, init, dropout = pick(sp.weight_decay), pick(sp.activation), pick(sp.init), pick(sp.dropout)
        arch = archs[i % len(archs)]
        plans.append(ModelPlan(
            model_id=f"model_{i:04d}",
            seed=seed,
            task=cfg.task,
            split_seed=cfg.split_seed,
            arch=arch,
            arch_kwargs=_arch_kwargs(arch, num_classes, cfg.width, act, dropout),
            hparams={
                "index": i, "seed": seed, "lr": lr, "weight_decay": float(wd), "init": init,
                "optimizer": "adam", "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                "task": cfg.task, "split_seed": cfg.split_seed,
            },
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
        ))
    return plans


def default_zoo_config() -> ZooGenConfig:
    """The built-in zoo the main job uses: 48 ``cnn_digits`` models x 10 epochs on ``digits``."""
    return ZooGenConfig()
