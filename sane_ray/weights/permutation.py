"""Permutation symmetries of a model's hidden units, and applying permutations to weights.

Reordering the hidden units of a layer (its output channels, the matching BatchNorm
entries and the next layer's input channels) leaves the function unchanged. A
:class:`PermutationSpec` names these *groups* of units and lists, per state-dict key,
which group permutes each axis. It is derived from a registered architecture
(:func:`permutation_spec`) or a built module (:func:`spec_for_module`):

* sequential models (``module_list``): every Conv2d/Linear output except the last
  layer's is a group; BatchNorm follows the preceding layer; the first layer's input and
  the last layer's output are fixed. A Flatten after a conv turns each channel into a
  block of ``H*W`` consecutive inputs of the next Linear (found by a dummy forward).
* ResNets: the residual stream keeps one group from the stem until a ``downsample``
  starts the next stream; each block's inner channels (``conv1``/``bn1``) are a group;
  ``fc`` reads the last stream.
* vision transformers: attention heads and MLP units per block, and one residual-stream
  group through all blocks (:mod:`sane_ray.weights.vit_spec`).

The spec's types live in :mod:`sane_ray.weights.perm_spec` (imported from here too).

A permutation ``p`` of a group moves unit ``p[i]`` to position ``i`` (``index_select``
semantics), so ``aligned = apply_permutation(model, spec, p)`` has
``aligned[i] = model[p[i]]`` on every permuted axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sane_ray.weights.perm_spec import PermutationSpec, PermutedAxis, SpecBuilder, SpecMismatchError
from sane_ray.weights.vit_spec import vit_spec
from sane_ray.zoo.architectures import (
    ACTIVATIONS,
    FAMILIES,
    BasicBlock,
    ResNet,
    SequentialNet,
    build_model,
    get_architecture,
    input_shape,
)
from sane_ray.zoo.vit import VisionTransformer

Perms = dict[str, torch.Tensor]


# ---------------------------------------------------------------- deriving specs


_CHANNELWISE = (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity,
    *set(ACTIVATIONS.values()),
)


def _input_shapes(model: nn.Module, modules: Sequence[nn.Module], shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Input shapes (without batch) of ``modules`` in a dummy forward pass."""
    seen: dict[int, tuple[int, ...]] = {}

    def recorder(i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen.setdefault(i, tuple(args[0].shape[1:]))

        return hook

    hooks = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *shape))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(modules))]


def _sequential_spec(model: SequentialNet, shape: tuple[int, ...], name: str) -> PermutationSpec:
    b = SpecBuilder(name, model.state_dict())
    layers = list(model.module_list)
    in_shapes = _input_shapes(model, layers, shape)
    weighted = [i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = weighted[-1] if weighted else -1
    current: PermutedAxis | None = None  # what permutes the feature axis flowing between layers
    for i, (m, in_shape) in enumerate(zip(layers, in_shapes)):
        prefix = f"module_list.{i}"
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"{name}: grouped convolution {prefix} has no permutation spec")
            out = None if i == last else b.group(prefix, m.weight.shape[0])
            b.param(f"{prefix}.weight", out, current)
            b.param(f"{prefix}.bias", out)
            current = out
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            b.batchnorm(prefix, current)
        elif isinstance(m, nn.Flatten):
            if current is not None:
                if (m.start_dim, m.end_dim) != (1, -1):
                    raise ValueError(
                        f"{name}: {prefix} flattens dims {m.start_dim}..{m.end_dim}; only 1..-1 is supported"
                    )
                current = PermutedAxis(current.group, current.block * math.prod(in_shape[1:]))
        elif not isinstance(m, _CHANNELWISE) or any(True for _ in m.parameters()):
            raise ValueError(f"{name}: {prefix} ({type(m).__name__}) is not known to preserve channel order")
    return b.build()


def _resnet_spec(model: ResNet, name: str) -> PermutationSpec:
    b = SpecBuilder(name, model.state_dict())
    stream = b.group("stream.conv1", model.conv1.weight.shape[0])
    b.param("conv1.weight", stream, None)
    b.batchnorm("bn1", stream)
    stages = sorted((n for n, _ in model.named_children() if n.startswith("layer")), key=lambda n: int(n[5:]))
    for stage in stages:
        for j, block in enumerate(getattr(model, stage)):
            prefix = f"{stage}.{j}"
            if not isinstance(block, BasicBlock):
                raise ValueError(f"{name}: {prefix} is a {type(block).__name__}; only BasicBlock is supported")
            inner = b.group(f"{prefix}.conv1", block.conv1.weight.shape[0])
            b.param(f"{prefix}.conv1.weight", inner, stream)
            b.batchnorm(f"{prefix}.bn1", inner)
            if block.downsample is not None:
                new = b.group(f"stream.{prefix}.downsample", block.downsample[0].weight.shape[0])
                b.param(f"{prefix}.downsample.0.weight", new, stream)
                b.batchnorm(f"{prefix}.downsample.1", new)
                stream = new
            b.param(f"{prefix}.conv2.weight", stream, inner)
            b.batchnorm(f"{prefix}.bn2", stream)
    b.param("fc.weight", None, stream)
    return b.build()


def spec_for_module(model: nn.Module, shape: tuple[int, ...], name: str = "model") -> PermutationSpec:
    """Derive the spec of a built model; ``shape`` is its (C, H, W) input (for flatten blocks)."""
    if isinstance(model, ResNet):
        return _resnet_spec(model, name)
    if isinstance(model, SequentialNet):
        return _sequential_spec(model, tuple(shape), name)
    if isinstance(model, VisionTransformer):
        return vit_spec(model, name)
    raise ValueError(f"{name}: no permutation spec for a {type(model).__name__}")


def _freeze(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


@functools.lru_cache(maxsize=64)
def _cached_spec(arch: str, frozen_kwargs: tuple) -> PermutationSpec:
    kwargs = dict(frozen_kwargs)
    family = get_architecture(arch).family
    model = build_model(arch, **kwargs)
    desc = f"{arch}({', '.join(f'{k}={v!r}' for k, v in frozen_kwargs)})"
    spec = spec_for_module(model, input_shape(arch, **kwargs), desc)
    if not isinstance(model, FAMILIES[family]):
        raise ValueError(f"{desc}: registry family {family!r} does not match the built {type(model).__name__}")
    return spec


def permutation_spec(arch: str, **arch_kwargs) -> PermutationSpec:
    """The spec of registered architecture ``arch`` built with ``arch_kwargs`` (cached)."""
    return _cached_spec(arch, tuple(sorted((k, _freeze(v)) for k, v in arch_kwargs.items())))


# ---------------------------------------------------------------- permutations


def identity_permutation(spec: PermutationSpec, device: torch.device | str | None = None) -> Perms:
    return {g: torch.arange(n, device=device) for g, n in spec.group_sizes.items()}


def random_permutation(
    spec: PermutationSpec, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Perms:
    """One uniformly random permutation per group (drawn on the generator's device)."""
    gen_device = generator.device if generator is not None else "cpu"
    return {
        g: torch.randperm(n, generator=generator, device=gen_device).to(device)
        for g, n in spec.group_sizes.items()
    }


def compose(first: Mapping[str, torch.Tensor], then: Mapping[str, torch.Tensor]) -> Perms:
    """The permutation equal to applying ``first`` and then ``then``."""
    return {g: first[g][then[g]] for g in first}


def invert(perms: Mapping[str, torch.Tensor]) -> Perms:
    """The permutation undoing ``perms``."""
    return {g: torch.argsort(p) for g, p in perms.items()}


def check_permutation(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`SpecMismatchError` unless ``perms`` holds a valid permutation for every group."""
    missing = [g for g in spec.group_sizes if g not in perms]
    extra = [g for g in perms if g not in spec.group_sizes]
    if missing or extra:
        raise SpecMismatchError(
            f"{spec.name}: permutation groups differ: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for g, n in spec.group_sizes.items():
        p = perms[g]
        if p.shape != (n,) or p.dtype != torch.int64:
            raise SpecMismatchError(
                f"{spec.name}: permutation of {g!r} must be int64 of shape ({n},), got {p.dtype} {tuple(p.shape)}"
            )
        if not torch.equal(torch.sort(p).values, torch.arange(n, device=p.device)):
            raise SpecMismatchError(f"{spec.name}: permutation of {g!r} is not a permutation of 0..{n - 1}")


def leading_dims(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, what: str = "state dict"
) -> tuple[int, ...]:
    """Check keys and shapes against ``spec``; return the common leading (stack) dims, () or (E,)."""
    missing = [k for k in spec.shapes if k not in state_dict]
    if missing:
        raise SpecMismatchError(f"{what} lacks {missing[0]!r} (and {len(missing) - 1} more) required by {spec.name}")
    extra = [k for k in state_dict if k not in spec.shapes]
    if extra:
        raise SpecMismatchError(f"{what} has {extra[0]!r} (and {len(extra) - 1} more), unknown to {spec.name}")
    lead: tuple[int, ...] | None = None
    for key, shape in spec.shapes.items():
        got = tuple(state_dict[key].shape)
        this = got[: len(got) - len(shape)]
        if got[len(this):] != shape or len(this) > 1 or (lead is not None and this != lead):
            want = f"{shape}" if lead is None else f"{lead + shape}"
            raise SpecMismatchError(f"{what}: {key!r} has shape {got}, {spec.name} expects {want}")
        lead = this
    return lead or ()


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index along an axis whose units span ``block`` consecutive entries each."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


def apply_permutation(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Permute every permuted axis of ``state_dict`` (one ``index_select`` per axis).

    Works on one model or a stack (each tensor with one extra leading dim, e.g. all epochs
    of a model, permuted alike). Unpermuted tensors are passed through, not copied.
    """
    lead = len(leading_dims(state_dict, spec))
    check_permutation(spec, perms)
    out: dict[str, torch.Tensor] = {}
    cache: dict[tuple[PermutedAxis, torch.device], torch.Tensor] = {}
    for key, axes in spec.axes.items():
        t = state_dict[key]
        for axis, pa in enumerate(axes):
            if pa is None:
                continue
            ck = (pa, t.device)
            if ck not in cache:
                cache[ck] = pa.index(perms[pa.group].to(t.device), spec.group_sizes[pa.group])
            t = t.index_select(axis + lead, cache[ck])
        out[key] = t
    return out


def stack_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack checkpoints of one architecture along a new leading dim (key order of the first)."""
    if not state_dicts:
        raise ValueError("no state dicts to stack")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            diff = sorted(set(keys) ^ set(sd))
            raise SpecMismatchError(
                f"checkpoint {i} has different keys than checkpoint 0: {diff[:5] or 'order differs'}"
            )
    try:
        return {k: torch.stack([sd[k] for sd in state_dicts]) for k in keys}
    except RuntimeError:
        bad = next(k for k in keys if len({tuple(sd[k].shape) for sd in state_dicts}) > 1)
        raise SpecMismatchError(f"checkpoints disagree on the shape of {bad!r}") from None


def unstack_state_dict(stacked: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Inverse of :func:`stack_state_dicts` (views into the stacked tensors)."""
    if not stacked:
        return []
    n = next(iter(stacked.values())).shape[0]
    return [{k: v[i] for k, v in stacked.items()} for i in range(n)]
