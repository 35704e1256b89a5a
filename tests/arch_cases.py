"""Architectures the weight-space tests run over, and models that look trained."""

from __future__ import annotations

import torch
from torch import nn

from sane_ray.zoo.architectures import build_model, input_shape

ARCHS = [
    ("cnn_mnist_public", {}),
    ("cnn_cifar_public", {}),
    ("cnn_digits", {}),
    ("cnn_digits_bn", {}),
    ("mlp_digits", {}),
    ("resnet18", {"width": 8}),
    ("vit_digits", {"patch_size": 2, "num_heads": 2}),
]
IDS = [a for a, _ in ARCHS]


def trained_like(arch: str, kw: dict, seed: int) -> nn.Module:
    """A model in eval mode with perturbed weights and nontrivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(arch, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(16, *input_shape(arch, **kw)))
    return model.eval()
