"""The permutation-spec data structure: which group of hidden units permutes which tensor axis.

Kept apart from the derivations (:mod:`sane_ray.weights.permutation` for sequential
models and ResNets, :mod:`sane_ray.weights.vit_spec` for vision transformers) so each
family's derivation can build on it without an import cycle.

An axis permuted by a group of ``n`` units is ``parts`` equal segments, each holding the
``n`` units in order, every unit spanning ``block`` consecutive indices: a Linear after a
Flatten has ``block = H*W``; an attention's ``in_proj_weight`` rows are its q, k and v
projections (``parts = 3``), each a run of heads of ``head_dim`` rows (``block =
head_dim``), and one head permutation moves the same heads in all three.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


class SpecMismatchError(ValueError):
    """A state dict or permutation does not fit a permutation spec (the message names the key)."""


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index along an axis whose units span ``block`` consecutive entries each."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


@dataclass(frozen=True)
class PermutedAxis:
    """One tensor axis permuted by ``group``: ``parts`` segments of the group's units, each ``block`` wide."""

    group: str
    block: int = 1
    parts: int = 1

    def index(self, units: torch.Tensor, n: int) -> torch.Tensor:
        """Axis indices of ``units`` (a permutation of the group's ``n`` units, or some of them) in every part."""
        idx = block_index(units, self.block)
        if self.parts == 1:
            return idx
        offsets = torch.arange(self.parts, device=units.device)[:, None] * (n * self.block)
        return (offsets + idx).reshape(-1)


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Which group permutes which axis of which state-dict key.

    ``shapes`` lists every key of the state dict (in order) with its shape; ``axes`` gives,
    per key, one entry per axis: a :class:`PermutedAxis` or ``None`` for a fixed axis
    (keys without permuted axes, e.g. ``num_batches_tracked`` or the last bias, pass
    through unchanged). ``group_sizes`` is the number of units of each group; ``members``
    lists each group's ``(key, axis, PermutedAxis)``.
    """

    name: str
    shapes: dict[str, tuple[int, ...]]
    axes: dict[str, tuple[PermutedAxis | None, ...]]
    group_sizes: dict[str, int]
    members: dict[str, tuple[tuple[str, int, PermutedAxis], ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        members: dict[str, list[tuple[str, int, PermutedAxis]]] = {g: [] for g in self.group_sizes}
        for key, shape in self.shapes.items():
            axes = self.axes.get(key, (None,) * len(shape))
            if len(axes) != len(shape):
                raise ValueError(f"{self.name}: {key!r} has {len(shape)} axes but {len(axes)} axis entries")
            for axis, (size, pa) in enumerate(zip(shape, axes)):
                if pa is None:
                    continue
                n = self.group_sizes.get(pa.group)
                if n is None:
                    raise ValueError(f"{self.name}: {key!r} axis {axis} names unknown group {pa.group!r}")
                if size != pa.parts * n * pa.block:
                    parts = f"{pa.parts} parts x " if pa.parts != 1 else ""
                    raise ValueError(
                        f"{self.name}: {key!r} axis {axis} has size {size}, group {pa.group!r} "
                        f"needs {parts}{n} units x block {pa.block}"
                    )
                members[pa.group].append((key, axis, pa))
        object.__setattr__(self, "axes", {k: self.axes.get(k, (None,) * len(s)) for k, s in self.shapes.items()})
        object.__setattr__(self, "members", {g: tuple(m) for g, m in members.items()})

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.group_sizes)

    @property
    def permuted_keys(self) -> tuple[str, ...]:
        """Keys with at least one permuted axis."""
        return tuple(k for k, axes in self.axes.items() if any(axes))


class SpecBuilder:
    """Collects groups and per-key axes while a derivation walks a module."""

    def __init__(self, name: str, state_dict: Mapping[str, torch.Tensor]):
        self.name = name
        self.shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        self.axes: dict[str, tuple[PermutedAxis | None, ...]] = {}
        self.group_sizes: dict[str, int] = {}

    def group(self, name: str, size: int) -> PermutedAxis:
        self.group_sizes[name] = size
        return PermutedAxis(name)

    def tensor(self, key: str, *axes: PermutedAxis | None) -> None:
        """Any tensor: its leading axes as given, the rest fixed (a missing key, e.g. ``bias=False``, is skipped)."""
        if key not in self.shapes:
            return
        ndim = len(self.shapes[key])
        if len(axes) > ndim:
            raise ValueError(f"{self.name}: {key!r} has {ndim} axes, not {len(axes)}")
        self.axes[key] = tuple(axes) + (None,) * (ndim - len(axes))

    def param(self, key: str, out: PermutedAxis | None, inp: PermutedAxis | None = None) -> None:
        """Weight-like tensor: axis 0 by ``out``, axis 1 (if any) by ``inp``, kernel axes fixed."""
        if key in self.shapes:
            self.tensor(key, *((out, inp) if len(self.shapes[key]) >= 2 else (out,)))

    def batchnorm(self, prefix: str, channel: PermutedAxis | None) -> None:
        for member in ("weight", "bias", "running_mean", "running_var"):
            self.param(f"{prefix}.{member}", channel)

    def layernorm(self, prefix: str, channel: PermutedAxis | None) -> None:
        for member in ("weight", "bias"):
            self.param(f"{prefix}.{member}", channel)

    def build(self) -> PermutationSpec:
        return PermutationSpec(self.name, self.shapes, self.axes, self.group_sizes)
