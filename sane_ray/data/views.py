"""The second view of a training window: a random function-preserving permutation of the model.

Standardization is one affine map per layer (a scalar mean and std), so it commutes
with permuting hidden units: permuting standardized tokens gives exactly the standardized
tokens of the permuted model. View j is therefore built from the canonical (aligned,
standardized) tokens alone: detokenize, permute every hidden-unit group at random,
tokenize again. The permutation acts on the tokenized keys only (BatchNorm state kept
aside is not part of the tokens), via the architecture's spec restricted to those keys.
"""

from __future__ import annotations

import functools
import json

import torch

from sane_ray.weights.permutation import PermutationSpec, apply_permutation, permutation_spec, random_permutation
from sane_ray.weights.tokenize import TokenLayout, detokenize, tokenize_stack


@functools.lru_cache(maxsize=64)
def layout_from_json(text: str) -> TokenLayout:
    """Parsed (and cached) layout: many blocks share a handful of layouts."""
    return TokenLayout.from_json(text)


@functools.lru_cache(maxsize=64)
def token_spec(architecture: str, arch_kwargs_json: str, layout_json: str) -> PermutationSpec:
    """The architecture's permutation spec restricted to the keys stored in the tokens."""
    spec = permutation_spec(architecture, **json.loads(arch_kwargs_json))
    keys = layout_from_json(layout_json).token_keys
    missing = [k for k in keys if k not in spec.shapes]
    if missing:
        raise ValueError(f"{spec.name}: token keys {missing[:3]} are not in the architecture's state dict")
    return PermutationSpec(
        f"{spec.name}[tokens]",
        {k: spec.shapes[k] for k in keys},
        {k: spec.axes[k] for k in keys},
        dict(spec.group_sizes),
    )


def permute_tokens(
    tokens: torch.Tensor, layout: TokenLayout, spec: PermutationSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Tokens (N, d_t) of the same model with its hidden units randomly permuted (same function)."""
    state = detokenize(tokens, layout)
    permuted = apply_permutation(state, spec, random_permutation(spec, generator))
    return tokenize_stack([permuted], layout.token_size, layout.include_bn).tokens[0]
