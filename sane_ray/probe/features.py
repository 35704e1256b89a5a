"""The two baselines SANE embeddings are compared with (flattened weights W and weight statistics s(W)),
and SANE embeddings summarized per layer the way s(W) summarizes weights (:func:`layer_moments`).

Both are computed from token stacks ``(B, N, d_t)`` of one token layout, i.e. exactly
the input SANE sees (aligned and standardized the way the run did it). Standardization
is one affine map per layer, shared by every model, so s(W) carries the same
information as on the raw weights (the probe standardizes every feature anyway);
alignment only permutes hidden units, which leaves per-layer statistics unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from sane_ray.weights.tokenize import TokenLayout

PERCENTILES = (1, 25, 50, 75, 99)
STAT_NAMES = ("mean", "var", *(f"p{q}" for q in PERCENTILES))


def _stats(values: np.ndarray) -> np.ndarray:
    """(B, M) real values -> (B, 7): mean, variance and the :data:`PERCENTILES` per row."""
    pct = np.percentile(values, PERCENTILES, axis=1).T
    return np.concatenate([values.mean(axis=1, keepdims=True), values.var(axis=1, keepdims=True), pct], axis=1)


def weight_statistics(tokens: torch.Tensor | np.ndarray, layout: TokenLayout) -> tuple[np.ndarray, list[str]]:
    """s(W): per layer, :data:`STAT_NAMES` of its weights and (if it has one) of its bias.

    Returns ``(features (B, F) float64, feature names)``. Only real values enter: a layer
    is cut out of the tokens as its ``(rows, chunks * d_t)`` matrix and the weight and bias
    columns are sliced from it, so the zero padding at the end of each row is never read.
    Vectorized over the ``B`` models of the stack.
    """
    x = np.asarray(tokens.detach().cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.shape[1:] != (layout.num_tokens, layout.token_size):
        raise ValueError(f"tokens of shape {tuple(x.shape[1:])} do not match the layout "
                         f"({layout.num_tokens} tokens of size {layout.token_size})")
    feats, names = [], []
    for spec in layout.layers:
        block = x[:, spec.offset : spec.offset + spec.num_tokens].reshape(len(x), spec.rows, -1)
        parts = [("weight", block[:, :, : spec.weight_cols])]
        if spec.bias_key is not None:
            parts.append(("bias", block[:, :, spec.weight_cols]))
        for part, values in parts:
            feats.append(_stats(values.reshape(len(x), -1)))
            names += [f"{spec.key}:{part}:{s}" for s in STAT_NAMES]
    return np.concatenate(feats, axis=1), names


def flat_weights(tokens: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """W: the real entries of each model's tokens (padding dropped), one row per model."""
    x = torch.as_tensor(tokens)
    m = torch.as_tensor(mask, dtype=torch.bool)
    if x.ndim == 2:
        x = x[None]
    return x[:, m].to(torch.float32).numpy()


def num_weights(mask: torch.Tensor | np.ndarray) -> int:
    """How many real values (weights and biases) one model of this mask has: W's width."""
    return int(torch.as_tensor(mask, dtype=torch.bool).sum())


def layer_moments(z: torch.Tensor, layer_index: torch.Tensor, with_std: bool = False) -> np.ndarray:
    """Per tokenized layer, the mean (and with ``with_std`` the population std) over that layer's tokens
    of the token latents ``z`` (B, N, d_z), concatenated layer by layer: (B, L * d_z), or with the std
    after each layer's mean (B, 2 * L * d_z).

    The paper's embedding averages over all tokens, so layers with many tokens dominate it and
    which latent came from which layer is lost; s(W) keeps one block per layer. This is the
    embedding counterpart of that per-layer structure, from the same encoder pass.
    ``layer_index`` (N,) is each token's layer (the tokens' ``pos[:, 1]``).
    """
    z = torch.as_tensor(z).detach().to(torch.float64)
    if z.ndim == 2:
        z = z[None]
    idx = torch.as_tensor(layer_index, dtype=torch.int64, device=z.device)
    if idx.shape != (z.shape[1],):
        raise ValueError(f"layer_index of shape {tuple(idx.shape)} does not match {z.shape[1]} tokens")
    layers = torch.unique(idx)  # sorted; a layer index without tokens gets no block
    blocks = []
    for layer in layers:
        part = z[:, idx == layer]
        blocks.append(part.mean(1))
        if with_std:
            blocks.append(part.std(1, correction=0))
    return torch.cat(blocks, 1).cpu().numpy()
