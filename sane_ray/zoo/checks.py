"""What makes a checkpoint usable, and the errors that say why one is not.

Real zoos contain diverged trainings (NaN/Inf or exploding weights), truncated uploads and
files from other architectures. Every reader funnels a decoded state dict through
:func:`validate_state_dict`, so the rules are the same for every layout, and every
skipped item goes through :func:`skip`, so each one is logged once with its path.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.spec import Skipped

log = logging.getLogger("sane_ray.zoo")

# Largest |weight| accepted (floating tensors, BN running statistics included). Trained
# small CNNs and ResNets stay below ~1e2; diverged trainings blow far past 1e4.
DEFAULT_MAX_ABS = 1e4


class ZooError(ValueError):
    """A zoo cannot be opened: the URI, layout or manifest is wrong (the message names it)."""


class BadCheckpointError(ValueError):
    """A checkpoint is unusable: ``path`` is where it lives, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def skip(path: str, reason: str) -> Skipped:
    """Record (and log at WARNING) a checkpoint or model left out of a zoo."""
    log.warning("skipping %s: %s", path, reason)
    return Skipped(path, reason)


@functools.lru_cache(maxsize=128)
def _layout(arch: str, kwargs_json: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    # Built on the meta device: shapes and dtypes without allocating or initializing weights.
    with torch.device("meta"):
        model = build_model(arch, **json.loads(kwargs_json))
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def reference_layout(arch: str, arch_kwargs: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Expected state-dict keys -> (shape, dtype) for an architecture, cached per (arch, kwargs).

    Raises ``UnknownArchitectureError`` for an unregistered name and ``ValueError`` for
    arguments the architecture does not accept.
    """
    return _layout(arch, json.dumps(dict(arch_kwargs), sort_keys=True))


def _short(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def validate_state_dict(
    state: Any, arch: str, arch_kwargs: Mapping[str, Any], path: str, max_abs: float = DEFAULT_MAX_ABS,
) -> dict[str, torch.Tensor]:
    """Check a decoded checkpoint against its architecture and return it as CPU tensors.

    Floating tensors come back as float32; integer buffers (``num_batches_tracked``) keep
    their dtype. Raises :class:`BadCheckpointError` for wrong keys or shapes, NaN/Inf, or
    any |value| above ``max_abs``.
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BadCheckpointError(path, f"not a state dict of named tensors (got {type(state).__name__})")
    layout = reference_layout(arch, arch_kwargs)
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout))
    if missing or unexpected:
        parts = ([f"missing keys {_short(missing)}"] if missing else []) + (
            [f"unexpected keys {_short(unexpected)}"] if unexpected else [])
        raise BadCheckpointError(path, f"keys do not match architecture {arch!r}: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} != {shape}" for k, (shape, _) in layout.items()
             if tuple(state[k].shape) != shape]
    if wrong:
        raise BadCheckpointError(path, f"shapes do not match architecture {arch!r}: {_short(wrong, 3)}")

    out: dict[str, torch.Tensor] = {}
    for k, (_, dtype) in layout.items():
        t = state[k].detach().cpu()
        out[k] = t.to(torch.float32) if dtype.is_floating_point else t
    floats = [k for k, (_, dtype) in layout.items() if dtype.is_floating_point and out[k].numel()]
    bad = [k for k in floats if not bool(torch.isfinite(out[k]).all())]
    if bad:
        raise BadCheckpointError(path, f"non-finite (NaN/Inf) weights in {_short(bad)}")
    if floats:
        peaks = torch.stack([out[k].abs().max() for k in floats])
        worst = int(peaks.argmax())
        if float(peaks[worst]) > max_abs:
            raise BadCheckpointError(
                path, f"weights too large: max |w| = {float(peaks[worst]):.3g} in {floats[worst]} "
                f"exceeds {max_abs:g}")
    return out


def as_float(x: Any) -> float:
    """A metric value as float (None or non-numbers -> NaN)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan
