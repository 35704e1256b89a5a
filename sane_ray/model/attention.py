"""Which kernel computes attention.

flash-attn's ``flash_attn_func`` is the fastest choice on CUDA in half precision (the
paper trains with it); everywhere else PyTorch's ``scaled_dot_product_attention``
picks its own best kernel. Both backends take and return ``(B, T, heads, head_dim)``
so the transformer block does not care which one it got.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

# attend(q, k, v, dropout_p) -> out, all (B, T, heads, head_dim); attention is non-causal.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """Whether the optional ``flash_attn`` package is importable (checked once)."""
    return importlib.util.find_spec("flash_attn") is not None


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=False
    )
    return out.transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=False)


def select_attention_backend(device: torch.device, dtype: torch.dtype) -> AttentionFn:
    """flash-attn on CUDA with fp16/bf16 inputs when installed, else SDPA."""
    if device.type == "cuda" and dtype in _HALF and flash_attn_available():
        return flash_attention
    return sdpa_attention
