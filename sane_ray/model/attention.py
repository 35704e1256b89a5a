"""Which kernel computes attention.

flash-attn's ``flash_attn_func`` is the fastest choice on CUDA in half precision (the
paper trains with it); everywhere else PyTorch's ``scaled_dot_product_attention``
picks its own best kernel. Both backends take and return ``(B, T, heads, head_dim)``
so the transformer block does not care which one it got.

Windows with padding tokens (models shorter than the window) pass a key mask
``(B, T)``, True on real tokens, so no token attends to padding. flash-attn's dense
kernel takes no mask: masked calls always go to SDPA, and windows without padding
pass no mask at all and keep the fastest kernels.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F

# attend(q, k, v, dropout_p, key_mask=None) -> out, all (B, T, heads, head_dim); attention is
# non-causal; key_mask (B, T) is True on the keys that may be attended to.
AttentionFn = Callable[..., torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """Whether the optional ``flash_attn`` package is importable (checked once)."""
    return importlib.util.find_spec("flash_attn") is not None


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, heads, queries, keys)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=False,
    )
    return out.transpose(1, 2)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    if key_mask is not None:
        raise ValueError("flash_attention takes no key mask; select_attention_backend(..., masked=True) picks SDPA")
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=False)


def select_attention_backend(device: torch.device, dtype: torch.dtype, masked: bool = False) -> AttentionFn:
    """flash-attn on CUDA with fp16/bf16 inputs and no key mask when installed, else SDPA."""
    if device.type == "cuda" and dtype in _HALF and not masked and flash_attn_available():
        return flash_attention
    return sdpa_attention
