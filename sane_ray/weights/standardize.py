"""Per-layer standardization of weights, with statistics from the training split only.

Each tokenized layer (state-dict weight key, see :func:`~sane_ray.weights.tokenize.split_keys`)
gets one mean and one std; its bias is standardized with the weight's statistics. Keys
kept aside by tokenization (BatchNorm state unless ``include_bn``, ``num_batches_tracked``)
pass through unchanged.

Statistics are pooled over all weight entries of a layer across all training models
and checkpoints (count, mean and sum of squared deviations ``m2``, in float64). Pooled
moments are exact under streaming updates and under merging partial results of
parallel workers (Chan et al.'s pairwise update), so a zoo never has to fit in memory.
For models of one architecture the pooled mean equals the reference's mean of per-model
means; the pooled variance is the reference's mean of per-model variances *plus* the
variance of the per-model means, i.e. the actual spread of the layer's weights that the
standardized values are meant to have unit variance over. Pooling also handles zoos
that mix architectures sharing key names. Variances are population variances (ddof 0);
a std below ``std_floor`` is raised to it, so constant layers map to zero instead of NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sane_ray.weights.tokenize import (
    BnMode,
    TokenLayout,
    bn_mode,
    layout_mask,
    split_keys,
)

STATS_FORMAT = "sane-ray/standardization"
STATS_VERSION = 1


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations of one layer's weights (float64)."""

    count: int
    mean: float
    m2: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        v = values.detach().to(torch.float64).flatten()
        if v.numel() == 0:
            return cls(0, 0.0, 0.0)
        mean = v.mean()
        return cls(v.numel(), float(mean), float(((v - mean) ** 2).sum()))

    def merged(self, other: Moments) -> Moments:
        """Moments of the union of both samples (Chan, Golub and LeVeque's pairwise update)."""
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return Moments(n, mean, m2)

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0


class StandardizationStats:
    """Per-layer mean/std, accumulated one model at a time; apply and invert on state dicts or tokens."""

    def __init__(self, include_bn: BnMode = False, std_floor: float = 1e-6, layers: Mapping[str, Moments] | None = None):
        if not std_floor > 0:
            raise ValueError(f"std_floor must be > 0, got {std_floor!r}")
        self.include_bn = bn_mode(include_bn)
        self.std_floor = float(std_floor)
        self.layers: dict[str, Moments] = dict(layers or {})

    # ------------------------------------------------------------ accumulate

    def update(self, state_dict: Mapping[str, torch.Tensor], stacked: bool = False) -> StandardizationStats:
        """Add one model (or, with ``stacked``, tensors with a leading batch dimension of checkpoints)."""
        shapes = {k: tuple(v.shape[1:] if stacked else v.shape) for k, v in state_dict.items()}
        for key, _ in split_keys(shapes, self.include_bn).groups:
            value = state_dict[key]
            if not value.is_floating_point():
                raise TypeError(f"cannot standardize {key!r}: dtype {value.dtype} is not floating")
            new = Moments.of(value)
            self.layers[key] = self.layers[key].merged(new) if key in self.layers else new
        return self

    @classmethod
    def from_models(
        cls, models: Iterable[Mapping[str, torch.Tensor]], include_bn: BnMode = False, std_floor: float = 1e-6
    ) -> StandardizationStats:
        """Stats of a stream of state dicts (e.g. the training split, read one at a time)."""
        stats = cls(include_bn, std_floor)
        for sd in models:
            stats.update(sd)
        return stats

    def merge(self, other: StandardizationStats) -> StandardizationStats:
        """A new object with the pooled statistics of both (e.g. of two parallel workers)."""
        if (self.include_bn, self.std_floor) != (other.include_bn, other.std_floor):
            raise ValueError(
                "cannot merge standardization stats with different settings: "
                f"include_bn {self.include_bn} vs {other.include_bn}, std_floor {self.std_floor} vs {other.std_floor}"
            )
        layers = dict(self.layers)
        for key, m in other.layers.items():
            layers[key] = layers[key].merged(m) if key in layers else m
        return StandardizationStats(self.include_bn, self.std_floor, layers)

    # ------------------------------------------------------------ query

    def _moments(self, key: str) -> Moments:
        try:
            return self.layers[key]
        except KeyError:
            known = ", ".join(list(self.layers)[:8]) + (", ..." if len(self.layers) > 8 else "")
            raise KeyError(f"standardization stats have no layer {key!r} (they cover: {known or 'nothing'})") from None

    def mean(self, key: str) -> float:
        return self._moments(key).mean

    def std(self, key: str) -> float:
        return max(math.sqrt(self._moments(key).var), self.std_floor)

    # ------------------------------------------------------------ state dicts

    def _map(self, state_dict: Mapping[str, torch.Tensor], invert: bool, stacked: bool) -> dict[str, torch.Tensor]:
        shapes = {k: tuple(v.shape[1:] if stacked else v.shape) for k, v in state_dict.items()}
        out = dict(state_dict)
        for weight_key, bias_key in split_keys(shapes, self.include_bn).groups:
            mean, std = self.mean(weight_key), self.std(weight_key)
            for key in (weight_key, bias_key) if bias_key else (weight_key,):
                v = state_dict[key]
                out[key] = v * std + mean if invert else (v - mean) / std
        return out

    def apply(self, state_dict: Mapping[str, torch.Tensor], stacked: bool = False) -> dict[str, torch.Tensor]:
        """Standardized copy of a state dict (aside keys unchanged, same key order).

        With ``stacked``, tensors carry a leading batch dimension (e.g. all epochs of a model).
        """
        return self._map(state_dict, invert=False, stacked=stacked)

    def invert(self, state_dict: Mapping[str, torch.Tensor], stacked: bool = False) -> dict[str, torch.Tensor]:
        """Undo :meth:`apply`."""
        return self._map(state_dict, invert=True, stacked=stacked)

    # ------------------------------------------------------------ tokens

    def token_affine(
        self, layout: TokenLayout, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token mean and std, float32 (N, 1), broadcasting over token entries."""
        per_layer = torch.tensor([s.num_tokens for s in layout.layers], dtype=torch.int64)
        means = torch.tensor([self.mean(s.key) for s in layout.layers], dtype=torch.float32)
        stds = torch.tensor([self.std(s.key) for s in layout.layers], dtype=torch.float32)
        return (torch.repeat_interleave(means, per_layer).unsqueeze(1).to(device),
                torch.repeat_interleave(stds, per_layer).unsqueeze(1).to(device))

    def apply_tokens(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Standardize tokens (N, d_t) or (B, N, d_t) of ``layout``; padding stays zero."""
        mean, std = self.token_affine(layout, tokens.device)
        return torch.where(layout_mask(layout, tokens.device), (tokens - mean) / std, 0.0)

    def invert_tokens(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """De-standardize tokens (e.g. decoded by the model) in one vectorized op; padding becomes zero."""
        mean, std = self.token_affine(layout, tokens.device)
        return torch.where(layout_mask(layout, tokens.device), torch.addcmul(mean, tokens, std), 0.0)

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "include_bn": self.include_bn,
            "std_floor": self.std_floor,
            "layers": {k: {"count": m.count, "mean": m.mean, "m2": m.m2} for k, m in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StandardizationStats:
        if data.get("format") != STATS_FORMAT or data.get("version") != STATS_VERSION:
            raise ValueError(
                f"not a {STATS_FORMAT} version {STATS_VERSION} document: "
                f"format={data.get('format')!r}, version={data.get('version')!r}"
            )
        layers = {k: Moments(int(v["count"]), float(v["mean"]), float(v["m2"])) for k, v in data["layers"].items()}
        return cls(bn_mode(data["include_bn"]), float(data["std_floor"]), layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> StandardizationStats:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StandardizationStats) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"StandardizationStats({len(self.layers)} layers, "
                f"include_bn={self.include_bn}, std_floor={self.std_floor})")
