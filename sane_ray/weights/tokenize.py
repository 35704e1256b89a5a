"""Model weights <-> token sequences (SANE tokenization), exactly invertible.

A state dict is walked in key order. Each tokenized tensor becomes a 2-d matrix of
``rows`` output channels (``weight.reshape(c_out, -1)``; a 0-d tensor is one row) and its
matching bias, if any, is appended as one extra column. A row longer than the token
size ``d_t`` is split into ``ceil(row_len / d_t)`` tokens and only the last chunk of a
row is zero-padded, so one layer is a plain zero-padded ``(rows, chunks * d_t)`` matrix
viewed as ``(rows * chunks, d_t)``: tokenizing and detokenizing are one strided copy per
tensor, with no per-row or per-element work.

What becomes a token (:func:`split_keys`):

* BatchNorm layers are the key prefixes that own ``running_mean``/``running_var``. The
  BN mode ``include_bn`` (:data:`BN_MODES`; this module owns it, the data config sets it)
  says which of their tensors are tokens:

  - ``False`` (default, the paper): ``weight``, ``bias`` and running statistics are kept
    aside (returned in ``Tokens.bn_state``); sampling restores them by BN-conditioning.
  - ``"affine"``: the BN ``weight`` (+ ``bias`` column) is one layer; the running
    statistics stay aside (BN-conditioning sets them, so they need no representation).
  - ``True`` (the reference's ResNets): the affine layer, and ``running_mean`` and
    ``running_var`` one layer each (3 tokens per channel when ``d_t >= 2``: 53,704 tokens
    for a 100-class CIFAR ResNet-18 at ``d_t = 288``, the paper's ~54k; 39,304 without BN).
* ``num_batches_tracked`` is never a token: it is always kept aside.
* Every other floating tensor is tokenized, including 1-d weights without running
  statistics (LayerNorm, GroupNorm): they are learned parameters that BN-conditioning
  cannot restore, so leaving them out would make the token sequence lossy.
* ``<name>bias`` pairs with ``<name>weight`` when that weight is tokenized and the bias has
  shape ``(c_out,)``; any other tensor (an unpaired bias included) is its own layer.

A vision transformer (``vit_digits``, torchvision's keys) needs no rule of its own.
``in_proj_bias`` pairs with ``in_proj_weight`` by the suffix rule, so its ``3 * hidden``
rows are the q, k and v units with their bias column (a head permutation moves rows);
LayerNorms give one row (weight, bias) per hidden unit, like BN in ``"affine"`` mode;
``class_token`` (1, 1, D) and ``pos_embedding`` (1, S, D) are one row each, chunked
(their hidden axis permutes columns). With hidden 32, 2 layers and MLP 64 (18,218
weights) that is 17 layers and 718 tokens at ``d_t = 64``, 1,178 at ``d_t = 32``, where
33-entry rows (32 inputs + bias) take two tokens, as in any such Linear.

Positions are 0-based ``(n, l, k)``: global token index, index of the tokenized layer,
and output row within the layer (repeated for the chunks of one row).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

BN_RUNNING_STATS = ("running_mean", "running_var")
BN_MEMBERS = ("weight", "bias", *BN_RUNNING_STATS, "num_batches_tracked")
# How BatchNorm is tokenized (see the module doc): excluded, affine weights only, everything.
BnMode = Literal[False, "affine", True]
BN_MODES: tuple[BnMode, ...] = (False, "affine", True)
LAYOUT_FORMAT = "sane-ray/token-layout"
LAYOUT_VERSION = 1

ShapeLike = Union[torch.Tensor, torch.Size, Sequence[int]]


class LayoutMismatchError(ValueError):
    """Tensors do not match a token layout (the message names the key and the shapes)."""


# ---------------------------------------------------------------- which keys are tokens


@dataclass(frozen=True)
class KeySplit:
    """How a state dict's keys are used: tokenized groups ``(weight_key, bias_key)`` and aside keys."""

    groups: tuple[tuple[str, str | None], ...]
    aside: tuple[str, ...]


def _shape_of(value: ShapeLike) -> tuple[int, ...]:
    return tuple(int(s) for s in (value.shape if isinstance(value, torch.Tensor) else value))


def _split_name(key: str) -> tuple[str, str]:
    head, _, name = key.rpartition(".")
    return head, name


def bn_mode(value: Any) -> BnMode:
    """``value`` checked as a BN mode (:data:`BN_MODES`); the error names the setting and the choices."""
    if value is False or value is True or value == "affine":
        return value
    raise ValueError(f"include_bn must be one of false (BN kept aside), affine (BN weights tokenized, running "
                     f"statistics aside) or true (everything tokenized), got {value!r}")


def split_keys(shapes: Mapping[str, tuple[int, ...]], include_bn: BnMode = False) -> KeySplit:
    """Decide, from key names and shapes only, which tensors are tokens and how they pair."""
    mode = bn_mode(include_bn)
    bn_prefixes = {_split_name(k)[0] for k in shapes if _split_name(k)[1] in BN_RUNNING_STATS}
    kept_out = {False: BN_MEMBERS, "affine": BN_RUNNING_STATS, True: ()}[mode]

    def is_aside(key: str) -> bool:
        head, name = _split_name(key)
        if name == "num_batches_tracked":
            return True
        return head in bn_prefixes and name in kept_out

    aside = tuple(k for k in shapes if is_aside(k))
    tokenized = [k for k in shapes if not is_aside(k)]
    token_set = set(tokenized)
    weight_of: dict[str, str] = {}  # bias key -> weight key
    for key in tokenized:
        if not key.endswith("bias"):
            continue
        weight_key = key[: -len("bias")] + "weight"
        w_shape = shapes.get(weight_key)
        if weight_key in token_set and w_shape and shapes[key] == (w_shape[0],):
            weight_of[key] = weight_key
    bias_of = {w: b for b, w in weight_of.items()}

    groups: list[tuple[str, str | None]] = []
    done: set[str] = set()
    for key in tokenized:
        if key in done:
            continue
        weight_key = weight_of.get(key, key)
        bias_key = bias_of.get(weight_key)
        groups.append((weight_key, bias_key))
        done.update((weight_key, bias_key) if bias_key else (weight_key,))
    return KeySplit(tuple(groups), aside)


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class LayerSpec:
    """One tokenized layer: a weight (and its bias column) at tokens ``offset .. offset + num_tokens``."""

    key: str
    shape: tuple[int, ...]
    bias_key: str | None
    offset: int
    rows: int
    row_len: int  # weight columns + 1 if there is a bias
    chunks: int  # tokens per row

    @property
    def weight_cols(self) -> int:
        return self.row_len - (self.bias_key is not None)

    @property
    def num_tokens(self) -> int:
        return self.rows * self.chunks


@dataclass(frozen=True)
class TokenLayout:
    """Everything needed to turn tokens back into a state dict; built from shapes alone.

    ``keys`` is the full key order of the state dict, ``aside`` the keys kept out of the
    tokens with their shapes. Frozen and hashable, so index tensors are cached per layout.
    """

    token_size: int
    include_bn: BnMode
    layers: tuple[LayerSpec, ...]
    aside: tuple[tuple[str, tuple[int, ...]], ...]
    keys: tuple[str, ...]
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        last = self.layers[-1] if self.layers else None
        object.__setattr__(self, "num_tokens", last.offset + last.num_tokens if last else 0)

    @property
    def token_keys(self) -> tuple[str, ...]:
        """The keys stored in the tokens (weights and their biases), in layer order."""
        return tuple(k for layer in self.layers for k in (layer.key, layer.bias_key) if k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "version": LAYOUT_VERSION,
            "token_size": self.token_size,
            "include_bn": self.include_bn,
            "keys": list(self.keys),
            "layers": [{"key": s.key, "shape": list(s.shape), "bias_key": s.bias_key} for s in self.layers],
            "aside": [{"key": k, "shape": list(shape)} for k, shape in self.aside],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenLayout:
        if data.get("format") != LAYOUT_FORMAT or data.get("version") != LAYOUT_VERSION:
            raise ValueError(
                f"not a {LAYOUT_FORMAT} version {LAYOUT_VERSION} document: "
                f"format={data.get('format')!r}, version={data.get('version')!r}"
            )
        groups = [(d["key"], tuple(d["shape"]), d["bias_key"]) for d in data["layers"]]
        aside = [(d["key"], tuple(d["shape"])) for d in data["aside"]]
        return _build_layout(int(data["token_size"]), bn_mode(data["include_bn"]), groups, aside, data["keys"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> TokenLayout:
        return cls.from_dict(json.loads(text))


def _check_token_size(token_size: int) -> int:
    if isinstance(token_size, bool) or not isinstance(token_size, int) or token_size < 1:
        raise ValueError(f"token_size must be an integer >= 1, got {token_size!r}")
    return token_size


def _build_layout(
    token_size: int,
    include_bn: BnMode,
    groups: Sequence[tuple[str, tuple[int, ...], str | None]],
    aside: Sequence[tuple[str, tuple[int, ...]]],
    keys: Sequence[str],
) -> TokenLayout:
    d = _check_token_size(token_size)
    layers, offset = [], 0
    for key, shape, bias_key in groups:
        rows = shape[0] if shape else 1
        cols = math.prod(shape[1:]) if shape else 1
        row_len = cols + (bias_key is not None)
        chunks = -(-row_len // d)
        layers.append(LayerSpec(key, tuple(shape), bias_key, offset, rows, row_len, chunks))
        offset += rows * chunks
    return TokenLayout(d, include_bn, tuple(layers), tuple((k, tuple(s)) for k, s in aside), tuple(keys))


def layout_from_state_dict(
    state_dict: Mapping[str, ShapeLike], token_size: int, include_bn: BnMode = False
) -> TokenLayout:
    """The token layout of a state dict; values may be tensors (any device, even meta) or shapes."""
    _check_token_size(token_size)
    shapes = {k: _shape_of(v) for k, v in state_dict.items()}
    split = split_keys(shapes, include_bn)
    groups = [(w, shapes[w], b) for w, b in split.groups]
    return _build_layout(token_size, include_bn, groups, [(k, shapes[k]) for k in split.aside], list(shapes))


@functools.lru_cache(maxsize=8)
def _index_tensors(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout's mask (N, d_t) and positions (N, 3), computed in one vectorized pass."""
    d, n_tok = layout.token_size, layout.num_tokens
    per_layer = torch.tensor([s.num_tokens for s in layout.layers], dtype=torch.int64)
    offsets = torch.tensor([s.offset for s in layout.layers], dtype=torch.int64)
    chunks = torch.tensor([s.chunks for s in layout.layers], dtype=torch.int64)
    row_len = torch.tensor([s.row_len for s in layout.layers], dtype=torch.int64)
    n = torch.arange(n_tok)
    layer = torch.repeat_interleave(torch.arange(len(layout.layers)), per_layer)
    local = n - offsets[layer]
    chunk = local % chunks[layer]
    filled = (row_len[layer] - chunk * d).clamp(max=d)
    mask = torch.arange(d) < filled[:, None]
    pos = torch.stack([n, layer, local // chunks[layer]], dim=1)
    return mask, pos


def layout_mask(layout: TokenLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (N, d_t): True on real weights, False on padding (a fresh tensor)."""
    return _index_tensors(layout)[0].to(device, copy=True)


def layout_positions(layout: TokenLayout, device: torch.device | str | None = None) -> torch.Tensor:
    """Int64 (N, 3) positions ``(n, l, k)`` (a fresh tensor)."""
    return _index_tensors(layout)[1].to(device, copy=True)


# ---------------------------------------------------------------- tokenize


@dataclass
class Tokens:
    """Tokens of one model, or of a stack of models of one layout.

    ``tokens`` is float32 (N, d_t) for one model and (B, N, d_t) for a stack; ``mask`` (N, d_t)
    and ``pos`` (N, 3) depend on the layout only. ``bn_state`` holds the tensors kept aside
    (with a leading B dimension for a stack).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor
    layout: TokenLayout
    bn_state: dict[str, torch.Tensor]


def _check_tensors(
    get: Mapping[str, Any], layout: TokenLayout, lead: tuple[int, ...], where: str
) -> None:
    """Raise a :class:`LayoutMismatchError` naming the first key that does not fit ``layout``."""
    known = set(layout.keys)
    missing = [k for k in layout.keys if k not in get]
    extra = [k for k in get if k not in known]
    if missing or extra:
        raise LayoutMismatchError(
            f"{where}: keys differ from the token layout: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    expected = {s.key: s.shape for s in layout.layers}
    expected.update({s.bias_key: (s.rows,) for s in layout.layers if s.bias_key})
    expected.update(dict(layout.aside))
    tokenized = set(layout.token_keys)
    for key in layout.keys:
        value = get[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != lead + expected[key]:
            raise LayoutMismatchError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, the layout expects {lead + expected[key]}"
            )
        if key in tokenized and not value.is_floating_point():
            raise TypeError(f"{where}: {key!r} has dtype {value.dtype}; only floating tensors can be tokenized")


def _write_layer(out: torch.Tensor, spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy one layer of B models (weight (B, *shape), bias (B, rows)) into ``out`` (B, N, d_t)."""
    b = out.shape[0]
    block = out[:, spec.offset : spec.offset + spec.num_tokens].view(b, spec.rows, spec.chunks * out.shape[2])
    block[:, :, : spec.weight_cols].copy_(weight.reshape(b, spec.rows, spec.weight_cols))
    if bias is not None:
        block[:, :, spec.weight_cols].copy_(bias)
    block[:, :, spec.row_len :].zero_()


def _empty_tokens(layout: TokenLayout, batch: int, like: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Uninitialized (B, N, d_t) float32 on the device of the first tokenized tensor."""
    device = like[layout.token_keys[0]].device if layout.layers else torch.device("cpu")
    return torch.empty(batch, layout.num_tokens, layout.token_size, device=device)


def tokenize(state_dict: Mapping[str, torch.Tensor], token_size: int, include_bn: BnMode = False) -> Tokens:
    """Tokenize one model: tokens float32 (N, d_t), mask, positions, layout and aside tensors."""
    layout = layout_from_state_dict(state_dict, token_size, include_bn)
    _check_tensors(state_dict, layout, (), "state dict")
    out = _empty_tokens(layout, 1, state_dict)
    with torch.no_grad():
        for spec in layout.layers:
            bias = state_dict[spec.bias_key].unsqueeze(0) if spec.bias_key else None
            _write_layer(out, spec, state_dict[spec.key].unsqueeze(0), bias)
    bn_state = {k: state_dict[k].detach().clone() for k, _ in layout.aside}
    return Tokens(out[0], layout_mask(layout, out.device), layout_positions(layout, out.device), layout, bn_state)


def tokenize_stack(
    models: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    token_size: int,
    include_bn: BnMode = False,
) -> Tokens:
    """Tokenize many models of one architecture at once: tokens (B, N, d_t).

    ``models`` is a list of state dicts, or one mapping of stacked tensors with a leading
    batch dimension (e.g. all epochs of one model). Each layer is copied for the whole
    stack in one operation (per model for a list, to avoid an intermediate stacked copy).
    """
    if isinstance(models, Mapping):
        stacked = models
        if not stacked:
            raise ValueError("tokenize_stack got an empty mapping")
        batch = next(iter(stacked.values())).shape[0]
        layout = layout_from_state_dict({k: v.shape[1:] for k, v in stacked.items()}, token_size, include_bn)
        _check_tensors(stacked, layout, (batch,), "stacked state dict")
        out = _empty_tokens(layout, batch, stacked)
        with torch.no_grad():
            for spec in layout.layers:
                _write_layer(out, spec, stacked[spec.key], stacked[spec.bias_key] if spec.bias_key else None)
        bn_state = {k: stacked[k].detach().clone() for k, _ in layout.aside}
    else:
        if not models:
            raise ValueError("tokenize_stack got no models")
        layout = layout_from_state_dict(models[0], token_size, include_bn)
        for i, sd in enumerate(models):
            _check_tensors(sd, layout, (), f"model {i} of the stack")
        out = _empty_tokens(layout, len(models), models[0])
        with torch.no_grad():
            for spec in layout.layers:
                for i, sd in enumerate(models):
                    bias = sd[spec.bias_key].unsqueeze(0) if spec.bias_key else None
                    _write_layer(out[i : i + 1], spec, sd[spec.key].unsqueeze(0), bias)
        bn_state = {k: torch.stack([sd[k].detach() for sd in models]) for k, _ in layout.aside}
    return Tokens(out, layout_mask(layout, out.device), layout_positions(layout, out.device), layout, bn_state)


# ---------------------------------------------------------------- detokenize


def _as_layout(layout: TokenLayout | Mapping[str, ShapeLike], token_size: int, include_bn: BnMode) -> TokenLayout:
    """A layout, or the layout of a reference state dict."""
    return layout if isinstance(layout, TokenLayout) else layout_from_state_dict(layout, token_size, include_bn)


def _assemble(
    layout: TokenLayout, tokens: torch.Tensor, lead: tuple[int, ...], bn_state: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """State dict from tokens (B, N, d_t) in layout key order; ``lead`` is () or (B,)."""
    b = tokens.shape[0]
    parts: dict[str, torch.Tensor] = {}
    for spec in layout.layers:
        block = tokens[:, spec.offset : spec.offset + spec.num_tokens].reshape(b, spec.rows, -1)
        weight = torch.empty((b, *spec.shape), dtype=torch.float32, device=tokens.device)
        weight.view(b, spec.rows, spec.weight_cols).copy_(block[:, :, : spec.weight_cols])
        parts[spec.key] = weight.view(lead + spec.shape)
        if spec.bias_key:
            bias = torch.empty((b, spec.rows), dtype=torch.float32, device=tokens.device)
            parts[spec.bias_key] = bias.copy_(block[:, :, spec.weight_cols]).view(lead + (spec.rows,))
    if bn_state is not None:
        for key, shape in layout.aside:
            value = bn_state.get(key)
            if value is None:
                raise LayoutMismatchError(f"bn_state lacks {key!r}, which the layout keeps aside")
            if tuple(value.shape) != lead + shape:
                raise LayoutMismatchError(f"bn_state {key!r} has shape {tuple(value.shape)}, expected {lead + shape}")
            parts[key] = value
    return {k: parts[k] for k in layout.keys if k in parts}


def _check_token_shape(tokens: torch.Tensor, layout: TokenLayout, batched: bool) -> None:
    want = f"({'B, ' if batched else ''}{layout.num_tokens}, {layout.token_size})"
    if tokens.ndim != 2 + batched or tuple(tokens.shape[-2:]) != (layout.num_tokens, layout.token_size):
        raise LayoutMismatchError(f"tokens have shape {tuple(tokens.shape)}, the layout needs {want}")


def detokenize(
    tokens: torch.Tensor,
    layout: TokenLayout | Mapping[str, ShapeLike],
    *,
    include_bn: BnMode = False,
    bn_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rebuild a state dict (float32, layout key order) from tokens (N, d_t), dropping padding.

    ``layout`` is a :class:`TokenLayout` or a reference state dict (then ``include_bn``
    says how it was tokenized). Without ``bn_state`` the aside keys are left out; with it
    they are merged back in their original positions.
    """
    layout = _as_layout(layout, tokens.shape[-1], include_bn)
    _check_token_shape(tokens, layout, batched=False)
    return _assemble(layout, tokens.unsqueeze(0), (), bn_state)


def detokenize_stack(
    tokens: torch.Tensor,
    layout: TokenLayout | Mapping[str, ShapeLike],
    *,
    include_bn: BnMode = False,
    bn_state: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Like :func:`detokenize` for tokens (B, N, d_t): every tensor gets a leading B dimension."""
    layout = _as_layout(layout, tokens.shape[-1], include_bn)
    _check_token_shape(tokens, layout, batched=True)
    return _assemble(layout, tokens, (tokens.shape[0],), bn_state)
