"""The architecture registry: rebuild any zoo checkpoint into a module.

A zoo stores an architecture *name* and its keyword arguments next to each checkpoint;
:func:`build_model` turns them back into an ``nn.Module`` whose ``state_dict`` keys
match the checkpoint. Sequential CNNs and MLPs keep their layers in ``module_list``
(the public model zoos' key names); ResNets and vision transformers (:mod:`sane_ray.zoo.vit`)
use torchvision's key names.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sane_ray.zoo.vit import VisionTransformer


class UnknownArchitectureError(KeyError):
    """The architecture name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leakyrelu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}") from None


class SequentialNet(nn.Module):
    """Layers applied in order, stored as ``module_list`` (the public zoos' key names)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.module_list = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.module_list:
            x = layer(x)
        return x


# ---------------------------------------------------------------- sequential families


def cnn_mnist_public(activation: str = "tanh", num_classes: int = 10, in_channels: int = 1) -> SequentialNet:
    """The public zoos' 2,464-parameter CNN for 28x28 grayscale (keys ``module_list.{0,3,6,9,11}``)."""
    act = lambda: make_activation(activation)  # noqa: E731
    return SequentialNet([
        nn.Conv2d(in_channels, 8, 5), nn.MaxPool2d(2), act(),
        nn.Conv2d(8, 6, 5), nn.MaxPool2d(2), act(),
        nn.Conv2d(6, 4, 2), act(),
        nn.Flatten(),
        nn.Linear(36, 20), act(),
        nn.Linear(20, num_classes),
    ])


def cnn_cifar_public(activation: str = "tanh", num_classes: int = 10, in_channels: int = 3) -> SequentialNet:
    """The public zoos' 10,853-parameter CNN for 32x32 RGB (keys ``module_list.{0,3,6,10,12}``)."""
    act = lambda: make_activation(activation)  # noqa: E731
    return SequentialNet([
        nn.Conv2d(in_channels, 16, 3), nn.MaxPool2d(2), act(),
        nn.Conv2d(16, 32, 3), nn.MaxPool2d(2), act(),
        nn.Conv2d(32, 15, 3), nn.MaxPool2d(2), act(),
        nn.Flatten(),
        nn.Linear(60, 20), act(),
        nn.Linear(20, num_classes),
    ])


def cnn_digits(
    activation: str = "relu", dropout: float = 0.0, num_classes: int = 10, in_channels: int = 1,
    batchnorm: bool = False, channels: int = 8, hidden: int = 16,
) -> SequentialNet:
    """A small CNN for 8x8 digits: conv(channels)-pool-conv(channels)-pool-fc(hidden)-fc(classes).

    With ``batchnorm`` a BatchNorm2d follows each conv, so BN-conditioning can be exercised.
    Dropout modules are always present (p may be 0) so state-dict keys do not depend on it.
    ``cnn_digits_wide`` (16 channels, 32 hidden) has the same keys and longer token sequences:
    the transfer target of sampling.
    """
    act = lambda: make_activation(activation)  # noqa: E731
    bn = (lambda c: [nn.BatchNorm2d(c)]) if batchnorm else (lambda c: [])
    return SequentialNet([
        nn.Conv2d(in_channels, channels, 3, padding=1), *bn(channels), act(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), *bn(channels), act(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels * 4, hidden), act(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    ])


def mlp_digits(
    activation: str = "relu", dropout: float = 0.0, num_classes: int = 10, in_features: int = 64,
    hidden: tuple[int, ...] = (32, 16),
) -> SequentialNet:
    """An MLP on flattened 8x8 digits (64 features)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), make_activation(activation), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return SequentialNet(layers)


# ---------------------------------------------------------------- ResNets (CIFAR variant)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with a 3x3 stride-1 ``conv1`` and no max-pool (CIFAR variant)."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, in_planes = width, width
        for i, n in enumerate(blocks):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            in_planes = planes
            planes *= 2
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)


def resnet_digits(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> ResNet:
    """A narrow ResNet for 8x8 digits: one BasicBlock per stage (8 -> 4 -> 2 -> 1 pixels), 77k parameters
    at width 8; the residual family in mixed-architecture zoos."""
    return ResNet((1, 1, 1, 1), num_classes, in_channels, width)


# ---------------------------------------------------------------- vision transformers


def vit_digits(
    num_classes: int = 10, in_channels: int = 1, patch_size: int = 4, hidden_dim: int = 32, num_layers: int = 2,
    num_heads: int = 4, mlp_dim: int = 64, dropout: float = 0.0, attention_dropout: float = 0.0,
    activation: str = "gelu",
) -> VisionTransformer:
    """A tiny ViT for 8x8 digits with torchvision's keys: patch 4 gives 4 patches + the class token
    (18,218 parameters at the defaults; patch 2: 16 + 1, as many parameters)."""
    return VisionTransformer(8, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                             num_classes, in_channels, lambda: make_activation(activation))


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: how to build it and what input it expects (C, H, W)."""

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    family: str  # a key of FAMILIES: selects how permutation specs are derived

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")


# The module class each family's builders return (checked where permutation specs are derived).
FAMILIES: dict[str, type[nn.Module]] = {"sequential": SequentialNet, "resnet": ResNet, "vit": VisionTransformer}


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("cnn_mnist_public", cnn_mnist_public, (1, 28, 28), "sequential"),
        Architecture("cnn_cifar_public", cnn_cifar_public, (3, 32, 32), "sequential"),
        Architecture("cnn_digits", cnn_digits, (1, 8, 8), "sequential"),
        # partials, not lambdas: their signatures still name the keyword arguments (see ``arguments``)
        Architecture("cnn_digits_bn", functools.partial(cnn_digits, batchnorm=True), (1, 8, 8), "sequential"),
        Architecture("cnn_digits_wide", functools.partial(cnn_digits, channels=16, hidden=32), (1, 8, 8),
                     "sequential"),
        Architecture("mlp_digits", mlp_digits, (1, 8, 8), "sequential"),
        Architecture("vit_digits", vit_digits, (1, 8, 8), "vit"),
        Architecture("resnet18", resnet18, (3, 32, 32), "resnet"),
        Architecture("resnet34", resnet34, (3, 32, 32), "resnet"),
        Architecture("resnet_digits", resnet_digits, (1, 8, 8), "resnet"),
    ]
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; registered: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def build_model(name: str, **kwargs) -> nn.Module:
    """Build registered architecture ``name`` with its keyword arguments (activation, classes, ...)."""
    arch = get_architecture(name)
    try:
        return arch.builder(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {kwargs} for architecture {name!r}: {e}") from e


def arguments(name: str) -> frozenset[str]:
    """The keyword arguments registered architecture ``name`` takes (``activation``, ``width``, ...):
    what a zoo's per-model draws may set on it."""
    return frozenset(inspect.signature(get_architecture(name).builder).parameters)


def input_shape(name: str, **kwargs) -> tuple[int, ...]:
    """The (C, H, W) input a registered architecture expects (channels follow ``in_channels``)."""
    shape = get_architecture(name).input_shape
    if "in_channels" in kwargs:
        shape = (int(kwargs["in_channels"]), *shape[1:])
    return shape
