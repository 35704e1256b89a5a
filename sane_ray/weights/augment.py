"""Training-time augmentations: function-preserving permutations and multiplicative noise.

SANE's two views of a model are the aligned model and a randomly permuted copy (same
function, different weights), each with multiplicative noise. Permutations can act on a
state dict (:func:`random_permute`) or directly on tokens: reordering the hidden units
of a layer permutes the rows of that layer's tokens and the input columns of every
layer that reads them (any permuted axis after the first, e.g. a ViT position
embedding's hidden axis, reorders columns), so the permuted tokens are one gather from the canonical ones
(:func:`token_permutation_index`, :func:`permute_tokens`). The gather can be limited to
a window of tokens, so a training sample never touches the rest of the model.
Standardization is a scalar affine map per layer, so it commutes with all of this.
"""

from __future__ import annotations

from collections.abc import Mapping

import math

import torch

from sane_ray.weights.permutation import (
    PermutationSpec,
    SpecMismatchError,
    apply_permutation,
    check_permutation,
    random_permutation,
)
from sane_ray.weights.tokenize import LayerSpec, TokenLayout


def random_permute(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A random function-preserving permutation of one model or a stack of its checkpoints.

    A stack (leading epoch dim) gets the same permutation for every checkpoint.
    """
    return apply_permutation(state_dict, spec, random_permutation(spec, generator))


def multiplicative_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x * (1 + sigma * eps)`` with ``eps ~ N(0, 1)`` drawn on ``x``'s device and dtype.

    Padding stays zero because the noise is multiplicative. ``generator`` must live on
    ``x``'s device.
    """
    if not sigma >= 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma!r}")
    if sigma == 0:
        return x.clone()
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.addcmul(x, x, eps, value=sigma)


def _layer_maps(
    layer: LayerSpec, spec: PermutationSpec, perms: Mapping[str, torch.Tensor], token_size: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Source row per row and source column per padded column of one layer (None: unchanged).

    A row is axis 0 of the weight (its units in any blocks and parts: a row gather); its
    columns are the other axes flattened, each permuted by its own group (a column gather).
    """
    axes = spec.axes.get(layer.key)
    if axes is None:
        raise SpecMismatchError(f"token layer {layer.key!r} is not in {spec.name}")
    if spec.shapes[layer.key] != layer.shape:
        raise SpecMismatchError(
            f"token layer {layer.key!r} has shape {layer.shape}, {spec.name} expects {spec.shapes[layer.key]}"
        )
    row_axis = axes[0] if axes else None
    if layer.bias_key is not None and spec.axes.get(layer.bias_key) != (row_axis,):
        raise SpecMismatchError(f"{spec.name}: bias {layer.bias_key!r} is not permuted like its weight {layer.key!r}")
    index = lambda pa: pa.index(perms[pa.group], spec.group_sizes[pa.group])  # noqa: E731
    rows = index(row_axis) if row_axis is not None else None
    cols = None
    if any(a is not None for a in axes[1:]):
        trailing = layer.shape[1:]
        flat = torch.arange(math.prod(trailing)).reshape(trailing)
        for dim, pa in enumerate(axes[1:]):
            if pa is not None:
                flat = flat.index_select(dim, index(pa))
        cols = torch.arange(layer.chunks * token_size)
        cols[: layer.weight_cols] = flat.reshape(-1)
    return rows, cols


def token_permutation_index(
    layout: TokenLayout,
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Flat gather index for tokens ``start:stop`` of the permuted model.

    ``tokens.reshape(-1)[index].view(stop - start, d_t)`` (or ``index_select`` on the
    flattened last two dims of a batch) equals the tokens of the permuted model in that
    range; padding maps to padding, so mask and positions are unchanged.
    """
    stop = layout.num_tokens if stop is None else stop
    if not 0 <= start <= stop <= layout.num_tokens:
        raise ValueError(f"token range {start}:{stop} is outside 0:{layout.num_tokens}")
    perms = {g: p.cpu() for g, p in perms.items()}
    check_permutation(spec, perms)
    d = layout.token_size
    parts = []
    for layer in layout.layers:
        lo, hi = max(start, layer.offset), min(stop, layer.offset + layer.num_tokens)
        if lo >= hi:
            continue
        rows, cols = _layer_maps(layer, spec, perms, d)
        local = torch.arange(lo - layer.offset, hi - layer.offset)
        row, chunk = local // layer.chunks, local % layer.chunks
        if rows is not None:
            row = rows[row]
        col = chunk[:, None] * d + torch.arange(d)
        if cols is not None:
            col = cols[col]
        parts.append(((layer.offset + row * layer.chunks) * d)[:, None] + col)
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).reshape(-1)


def permute_tokens(
    tokens: torch.Tensor,
    layout: TokenLayout,
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Tokens ``start:stop`` of the permuted model from tokens (N, d_t) or a batch (B, N, d_t)."""
    if tokens.shape[-2:] != (layout.num_tokens, layout.token_size) or tokens.ndim not in (2, 3):
        raise SpecMismatchError(
            f"tokens have shape {tuple(tokens.shape)}, the layout needs ([B,] {layout.num_tokens}, {layout.token_size})"
        )
    index = token_permutation_index(layout, spec, perms, start, stop).to(tokens.device)
    flat = tokens.reshape(*tokens.shape[:-2], -1)
    return flat.index_select(-1, index).view(*tokens.shape[:-2], -1, layout.token_size)
