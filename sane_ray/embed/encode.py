"""Whole-model embeddings with haloing (paper Algorithm 2), batched over many models in torch;
the same passes decode sampled latents (:func:`decode_haloed`, Algorithm 3).

A model of N tokens is cut into content windows of ``window_size - 2 * halo`` tokens;
each is encoded inside a pass of exactly ``window_size`` tokens that adds ``halo`` tokens
of context on both sides, and only the content tokens' latents are kept. At the ends
the pass is shifted inwards (the first takes all its context after the content, the
last all before), as the reference's ``haloify`` does, so every pass is a full training
window and each token is kept exactly once. A model no longer than one window is a
single pass (padded like the training windows of short models), so haloing changes
nothing there. ``halo=0`` gives plain non-overlapping windows (the last one shifted).

From the stitched token latents z (B, N, d_z): the model embedding is their mean over
the (all real) tokens, their std over tokens its second moment, and the per-layer spread (paper eq. 8) is, per tokenized layer,
the population std over the layer's tokens of each latent dimension, averaged over
dimensions: one scalar per layer index.

All windows of all models are enumerated at once and encoded in chunks of
``batch_windows`` passes: one gather and one scatter per chunk, no Python loop over
windows or tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sane_ray.embed.preprocess import preprocess
from sane_ray.model.sane import SaneModel
from sane_ray.weights.tokenize import Tokens


@dataclass(frozen=True)
class HaloPlan:
    """Passes over one sequence: pass start, and the content range [lo, hi) kept from it."""

    starts: torch.Tensor  # int64 (W,)
    lo: torch.Tensor  # int64 (W,)
    hi: torch.Tensor  # int64 (W,)
    window_size: int
    num_tokens: int


def default_halo(window_size: int) -> int:
    """A quarter window on each side: content is half the pass (the reference's 128 + 2 x 64 = 256)."""
    return window_size // 4


def halo_plan(num_tokens: int, window_size: int, halo: int | None = None) -> HaloPlan:
    """Passes of ``window_size`` tokens whose contents tile ``0 .. num_tokens`` (see the module doc)."""
    halo = default_halo(window_size) if halo is None else halo
    content = window_size - 2 * halo
    if window_size < 1 or halo < 0 or content < 1:
        raise ValueError(
            f"halo={halo} leaves no content in a window of {window_size} tokens (need 0 <= 2 * halo < window_size)"
        )
    if num_tokens < 1:
        raise ValueError("cannot plan windows over an empty token sequence")
    if num_tokens <= window_size:
        zero = torch.zeros(1, dtype=torch.int64)
        return HaloPlan(zero, zero, torch.full((1,), num_tokens), window_size, num_tokens)
    lo = torch.arange(0, num_tokens, content, dtype=torch.int64)
    hi = torch.clamp(lo + content, max=num_tokens)
    starts = torch.clamp(lo - halo, min=0, max=num_tokens - window_size)
    return HaloPlan(starts, lo, hi, window_size, num_tokens)


@torch.no_grad()  # not inference_mode: the pretraining probe signal encodes with the FSDP-wrapped training model
def _haloed(
    stack: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    pos: torch.Tensor,
    plan: HaloPlan,
    pad_position: Sequence[int],
    width_out: int,
    device: torch.device,
    batch_windows: int,
) -> torch.Tensor:
    """Run ``stack(x_window, pos_window, valid)`` (the encoder or the decoder) over the passes of
    ``plan`` for x (B, N, width_in) and stitch the content rows into (B, N, width_out)."""
    b, n, _ = x.shape
    if n != plan.num_tokens:
        raise ValueError(f"the plan covers {plan.num_tokens} tokens, the models have {n}")
    x, pos = x.to(device), pos.to(device)
    starts, lo, hi = plan.starts.to(device), plan.lo.to(device), plan.hi.to(device)
    w, ws = len(starts), plan.window_size
    pad = torch.tensor(list(pad_position), dtype=torch.int64, device=device)
    offsets = torch.arange(ws, device=device)
    out = torch.empty(b, n, width_out, device=device)
    for first in range(0, b * w, batch_windows):
        k = torch.arange(first, min(first + batch_windows, b * w), device=device)
        row, win = k // w, k % w
        idx = starts[win, None] + offsets  # (K, ws) token index of each slot
        valid = idx < n
        safe = idx.clamp(max=n - 1)
        xw = torch.where(valid[..., None], x[row[:, None], safe], 0.0)
        p = torch.where(valid[..., None], pos[safe], pad)
        y = stack(xw, p, valid)
        keep = (idx >= lo[win, None]) & (idx < hi[win, None])
        out[row[:, None].expand_as(idx)[keep], idx[keep]] = y[keep].float()
    return out


def encode_haloed(
    model: SaneModel,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    plan: HaloPlan,
    pad_position: Sequence[int],
    batch_windows: int = 256,
) -> torch.Tensor:
    """Latents (B, N, d_z) of tokens (B, N, d_t) at positions (N, 3), encoded pass by pass per ``plan``."""
    device = next(model.parameters()).device
    return _haloed(model.encode, tokens, pos, plan, pad_position, model.cfg.d_z, device, batch_windows)


def decode_haloed(
    model: SaneModel,
    latents: torch.Tensor,
    pos: torch.Tensor,
    plan: HaloPlan,
    pad_position: Sequence[int],
    batch_windows: int = 256,
) -> torch.Tensor:
    """Tokens (B, N, d_t) decoded from latents (B, N, d_z) with the same passes as :func:`encode_haloed`:
    each content window is decoded inside its halo context and only the content is kept
    (the decoder half of the paper's haloing, used by sampling)."""
    device = next(model.parameters()).device
    return _haloed(model.decode, latents, pos, plan, pad_position, model.cfg.d_t, device, batch_windows)


@dataclass
class Embeddings:
    """Per model: ``mean`` and ``std`` over tokens (B, d_z), ``layer_spread`` (B, L), optionally the token latents (B, N, d_z).

    ``std`` (population std of each latent dimension over the model's tokens) is the spread
    of the token surface around its centre of gravity ``mean``: a second moment the mean
    alone drops (docs/probe.md measures what it adds to a linear probe).
    """

    mean: torch.Tensor
    layer_spread: torch.Tensor
    std: torch.Tensor
    tokens: torch.Tensor | None = None


def summarize(z: torch.Tensor, layer_index: torch.Tensor, keep_tokens: bool = False) -> Embeddings:
    """Mean over tokens and per-layer spread of token latents z (B, N, d_z); ``layer_index`` (N,)."""
    layer_index = layer_index.to(z.device)
    num_layers = int(layer_index.max()) + 1
    counts = torch.bincount(layer_index, minlength=num_layers).to(z.dtype)[None, :, None]
    sums = z.new_zeros(z.shape[0], num_layers, z.shape[2]).index_add_(1, layer_index, z)
    dev = z - (sums / counts)[:, layer_index]
    var = z.new_zeros(sums.shape).index_add_(1, layer_index, dev * dev) / counts
    return Embeddings(z.mean(1), var.sqrt().mean(-1), z.std(1, correction=0), z if keep_tokens else None)


def concat_tokens(parts: Sequence[Tokens]) -> Tokens:
    """Preprocessed tokens of several models of one layout as one stack (B, N, d_t), to embed together.

    Preprocess each model separately (:func:`preprocess` aligns all checkpoints it is given
    with one permutation, i.e. treats them as epochs of one model), then concatenate.
    """
    layout = parts[0].layout
    if any(p.layout != layout for p in parts):
        raise ValueError("concat_tokens needs tokens of one layout (embed other architectures separately)")
    stacks = [p.tokens if p.tokens.dim() == 3 else p.tokens.unsqueeze(0) for p in parts]
    bn = {k: torch.cat([p.bn_state[k] if p.tokens.dim() == 3 else p.bn_state[k].unsqueeze(0) for p in parts])
          for k in parts[0].bn_state}
    return Tokens(torch.cat(stacks), parts[0].mask, parts[0].pos, layout, bn)


def embed_tokens(
    run: Any,
    toks: Tokens,
    *,
    window_size: int | None = None,
    halo: int | None = None,
    keep_tokens: bool = False,
    batch_windows: int = 256,
) -> Embeddings:
    """Embeddings of preprocessed tokens (N, d_t) or (B, N, d_t) of one layout (from
    :func:`~sane_ray.embed.preprocess.preprocess`). ``window_size`` defaults to the run's
    training window (its model config's), ``halo`` to a quarter of it."""
    tokens = toks.tokens if toks.tokens.dim() == 3 else toks.tokens.unsqueeze(0)
    plan = halo_plan(tokens.shape[1], window_size or run.model.cfg.window_size, halo)
    z = encode_haloed(run.model, tokens, toks.pos, plan, run.preprocessing.pad_position, batch_windows)
    return summarize(z, toks.pos[:, 1], keep_tokens)


def embed_checkpoints(
    run: Any,
    checkpoints: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    architecture: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Embeddings:
    """Preprocess raw checkpoints (one state dict, or the epochs of *one* model) and embed them;
    ``kwargs`` go to :func:`embed_tokens`. For several models use :func:`concat_tokens`."""
    return embed_tokens(run, preprocess(run, checkpoints, architecture, arch_kwargs), **kwargs)
