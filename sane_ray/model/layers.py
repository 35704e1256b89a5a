"""Building blocks of the SANE autoencoder: position embedding, transformer block, projection head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sane_ray.model.attention import select_attention_backend
from sane_ray.model.linear import Linear

_COORDS = ("n (token index)", "l (layer index)", "k (row index)")


class PositionOutOfRangeError(ValueError):
    """A token position does not fit the model's position tables (the message says which)."""


def check_tables(need: Sequence[int], max_positions: Sequence[int], setting: str, what: str, fix: str = "") -> None:
    """Raise :class:`PositionOutOfRangeError` unless tables of ``max_positions`` rows hold ``need``
    rows (largest position + 1) per coordinate ``(n, l, k)``.

    The one fit check, so a zoo before training, a target before sampling and every forward
    are refused alike; ``setting`` names the tables as the caller's user sets them.
    """
    need, have = [int(v) for v in need], [int(v) for v in max_positions]
    short = [f"{name} needs {n}" for name, n, h in zip(_COORDS, need, have) if n > h]
    if short:
        raise PositionOutOfRangeError(
            f"{setting}={have} is too small for {what}: its tokens need position tables of at least {need} "
            f"(n, l, k; {', '.join(short)})" + (f"; {fix}" if fix else ""))


def check_positions(pos: torch.Tensor, max_positions: tuple[int, int, int]) -> None:
    """Raise :class:`PositionOutOfRangeError` unless ``0 <= pos[..., i] < max_positions[i]``.

    ``nn.Embedding`` would fail with an anonymous index error on CPU and a device-side
    assert on CUDA; this check names the coordinate and the setting to raise. One
    small reduction and a single host sync per call.
    """
    if pos.shape[-1] != 3:
        raise ValueError(f"positions must have shape (..., 3) for (n, l, k), got {tuple(pos.shape)}")
    if pos.numel() == 0:
        return
    flat = pos.reshape(-1, 3)
    lo, *hi = torch.cat([flat.amin().reshape(1), flat.amax(0)]).tolist()
    if lo < 0:
        raise PositionOutOfRangeError(f"token positions must be non-negative, got a minimum of {lo}")
    check_tables([top + 1 for top in hi], max_positions, "SaneConfig.max_positions", "these token positions")


class PositionEmbedding(nn.Module):
    """Learned 3-d position embedding: ``[E_n(n) + E_l(l), E_k(k)]`` over the two halves of d_model."""

    def __init__(self, d_model: int, max_positions: tuple[int, int, int]):
        super().__init__()
        half = d_model // 2
        self.max_positions = tuple(max_positions)
        self.n = nn.Embedding(max_positions[0], half)
        self.l = nn.Embedding(max_positions[1], half)
        self.k = nn.Embedding(max_positions[2], d_model - half)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        check_positions(pos, self.max_positions)
        return torch.cat([self.n(pos[..., 0]) + self.l(pos[..., 1]), self.k(pos[..., 2])], dim=-1)


class Block(nn.Module):
    """Pre-LayerNorm transformer block without biases: non-causal attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model, bias=False)
        self.qkv = Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model, bias=False)
        self.fc_in = Linear(d_model, 4 * d_model, bias=False)
        self.fc_out = Linear(4 * d_model, d_model, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` (B, T): True on real tokens; None when there is no padding."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        attend = select_attention_backend(q.device, q.dtype, masked=key_mask is not None)
        a = attend(q, k, v, self.dropout if self.training else 0.0, key_mask).reshape(b, t, d)
        x = x + self.resid_drop(self.out_proj(a))
        return x + self.resid_drop(self.fc_out(F.gelu(self.fc_in(self.ln2(x)))))


class ProjectionHead(nn.Module):
    """Mean-pool a window's latents over its real tokens, then a small MLP.

    Pooling first makes the head independent of the window length (the reference
    flattens the window, which fixes it), costs one MLP call per window instead of
    per token, and shapes the very quantity downstream users read as the model
    embedding: the mean of the token latents. The output ends in a Linear (no ReLU)
    so cosine similarities are not confined to the positive orthant.
    """

    def __init__(self, d_z: int, dim: int):
        super().__init__()
        self.fc1 = Linear(d_z, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = Linear(dim, dim)

    def forward(self, z: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if token_mask is None:
            pooled = z.mean(dim=1)
        else:
            w = token_mask.to(z.dtype).unsqueeze(-1)
            pooled = (z * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return self.fc2(F.relu(self.norm(self.fc1(pooled))))
