"""A vision transformer with torchvision's ViT state-dict key names, written out here.

torchvision cannot be a dependency, yet a ViT zoo should load into (and come from)
``torchvision.models.VisionTransformer``: the module tree below is the one that yields
its keys (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_{i}.{ln_1,self_attention,ln_2,mlp}``, ``encoder.ln``,
``heads.head``) with pre-norm blocks, LayerNorm eps 1e-6 and the same initialization
(all drawn from torch's global RNG, so ``torch.manual_seed`` fixes a model). The MLP
activation is a constructor argument (torchvision's is GELU): a zoo may vary it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

LAYER_NORM_EPS = 1e-6  # torchvision's ViT norm layer


class MLPBlock(nn.Sequential):
    """Linear, activation, Dropout, Linear, Dropout: torchvision's indices, so keys are ``mlp.0`` and ``mlp.3``."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float, activation: Callable[[], nn.Module]):
        super().__init__(nn.Linear(dim, mlp_dim), activation(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + attention(ln_1(x))``, then ``+ mlp(ln_2(.))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 activation: Callable[[], nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLPBlock(dim, mlp_dim, dropout, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.dropout(self.self_attention(h, h, h, need_weights=False)[0])
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embedding, the blocks as ``layers.encoder_layer_{i}``, a final LayerNorm ``ln``."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float, activation: Callable[[], nn.Module]):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(dim, num_heads, mlp_dim, dropout, attention_dropout, activation))
            for i in range(num_layers)
        ))
        self.ln = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """Patches by a strided conv, a class token in front, the encoder, a linear head on the class token."""

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0, num_classes: int = 10,
                 in_channels: int = 3, activation: Callable[[], nn.Module] = nn.GELU):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size must divide the image size {image_size}, got {patch_size}")
        if num_heads < 1 or hidden_dim % num_heads:
            raise ValueError(f"num_heads must divide hidden_dim {hidden_dim}, got {num_heads}")
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                               activation)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / self.conv_proj.weight[0].numel()))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape)}")
        patches = self.conv_proj(x).flatten(2).transpose(1, 2)  # (batch, patches, hidden)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return self.heads(self.encoder(x)[:, 0])
