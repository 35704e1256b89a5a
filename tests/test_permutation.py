"""Permutation specs derived from the architecture registry, and applying permutations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sane_ray.weights.permutation import (
    PermutationSpec,
    SpecMismatchError,
    apply_permutation,
    compose,
    identity_permutation,
    invert,
    permutation_spec,
    random_permutation,
    spec_for_module,
    stack_state_dicts,
    unstack_state_dict,
)
from sane_ray.zoo.architectures import SequentialNet, build_model, input_shape

from arch_cases import ARCHS, IDS, trained_like


def logits(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(x)


def assert_same_function(arch: str, kw: dict, model: nn.Module, a: dict, b: dict) -> None:
    x = torch.randn(8, *input_shape(arch, **kw), generator=torch.Generator().manual_seed(1))
    ya, yb = logits(model, a, x), logits(model, b, x)
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-5 * float(ya.abs().max()))


@pytest.mark.parametrize("arch,kw", ARCHS, ids=IDS)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_permutation_preserves_function(arch, kw, seed):
    model = trained_like(arch, kw, seed % 1000)
    sd = model.state_dict()
    spec = permutation_spec(arch, **kw)
    perms = random_permutation(spec, torch.Generator().manual_seed(seed))
    permuted = apply_permutation(sd, spec, perms)
    assert any(not torch.equal(permuted[k], sd[k]) for k in spec.permuted_keys)
    assert_same_function(arch, kw, model, sd, permuted)


def test_full_width_resnet18_permutation_preserves_function():
    model = trained_like("resnet18", {}, 0)
    sd = model.state_dict()
    spec = permutation_spec("resnet18")
    assert spec.group_sizes["stream.layer4.0.downsample"] == 512
    permuted = apply_permutation(sd, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert_same_function("resnet18", {}, model, sd, permuted)


def expected_permuted_axes(model: nn.Module) -> set[tuple[str, int]]:
    """Every axis a hidden-unit permutation must touch, written out from the modules alone."""
    sd = model.state_dict()
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, last = weighted[0][0], weighted[-1][0]
    out: set[tuple[str, int]] = set()
    for name, m in weighted:
        if name != last:
            out.add((f"{name}.weight", 0))
            if f"{name}.bias" in sd:
                out.add((f"{name}.bias", 0))
        if name != first:
            out.add((f"{name}.weight", 1))
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            out.update((f"{name}.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var"))
        if isinstance(m, nn.LayerNorm):
            out.update({(f"{name}.weight", 0), (f"{name}.bias", 0)})
        if isinstance(m, nn.MultiheadAttention):
            out.update({(f"{name}.in_proj_weight", 0), (f"{name}.in_proj_weight", 1), (f"{name}.in_proj_bias", 0)})
    out.update((k, 2) for k in ("class_token", "encoder.pos_embedding") if k in sd)  # a ViT's hidden axis
    return out


@pytest.mark.parametrize("arch,kw", ARCHS + [("resnet34", {"width": 4})], ids=IDS + ["resnet34"])
def test_spec_covers_every_non_fixed_axis(arch, kw):
    spec = permutation_spec(arch, **kw)
    model = build_model(arch, **kw)
    got = {(k, a) for k, axes in spec.axes.items() for a, pa in enumerate(axes) if pa is not None}
    assert got == expected_permuted_axes(model)
    assert list(spec.shapes) == list(model.state_dict())
    assert all(spec.members[g] for g in spec.group_sizes)


@pytest.mark.parametrize(
    "arch,key,block",
    [
        ("cnn_mnist_public", "module_list.9.weight", 9),
        ("cnn_cifar_public", "module_list.10.weight", 4),
        ("cnn_digits", "module_list.8.weight", 4),
        ("cnn_digits_bn", "module_list.10.weight", 4),
    ],
)
def test_flatten_permutes_linear_input_in_blocks_of_hw(arch, key, block):
    spec = permutation_spec(arch)
    conv_group = spec.axes[key][1].group
    assert spec.axes[key][1].block == block
    assert spec.shapes[key][1] == spec.group_sizes[conv_group] * block


def test_resnet_streams_share_one_group_per_stage():
    spec = permutation_spec("resnet18", width=8)
    out = lambda key: spec.axes[key][0].group  # noqa: E731
    inp = lambda key: spec.axes[key][1].group  # noqa: E731
    assert out("conv1.weight") == out("bn1.running_mean") == out("layer1.0.conv2.weight") == out("layer1.1.bn2.bias")
    assert inp("layer2.0.conv1.weight") == inp("layer2.0.downsample.0.weight") == out("layer1.1.conv2.weight")
    stage2 = out("layer2.0.downsample.0.weight")
    assert stage2 == out("layer2.0.bn2.weight") == out("layer2.1.conv2.weight") == inp("layer2.1.conv1.weight")
    assert inp("fc.weight") == out("layer4.1.conv2.weight") and spec.axes["fc.bias"] == (None,)
    assert spec.axes["conv1.weight"][1] is None and spec.axes["layer1.0.bn1.num_batches_tracked"] == ()
    inner = out("layer3.1.conv1.weight")
    assert inner == inp("layer3.1.conv2.weight") == out("layer3.1.bn1.running_var")
    assert len(spec.group_sizes) == 4 + 8


@pytest.mark.parametrize("arch,kw", [("cnn_digits_bn", {}), ("resnet18", {"width": 8})], ids=["cnn_bn", "resnet18"])
def test_stack_compose_invert(arch, kw):
    spec = permutation_spec(arch, **kw)
    checkpoints = [trained_like(arch, kw, s).state_dict() for s in range(3)]
    gen = torch.Generator().manual_seed(3)
    p, q = random_permutation(spec, gen), random_permutation(spec, gen)
    stacked = apply_permutation(stack_state_dicts(checkpoints), spec, p)
    for sd, got in zip(checkpoints, unstack_state_dict(stacked)):
        want = apply_permutation(sd, spec, p)
        assert all(torch.equal(got[k], want[k]) for k in sd)
    sd = checkpoints[0]
    two_steps = apply_permutation(apply_permutation(sd, spec, p), spec, q)
    one_step = apply_permutation(sd, spec, compose(p, q))
    back = apply_permutation(apply_permutation(sd, spec, p), spec, invert(p))
    same = apply_permutation(sd, spec, identity_permutation(spec))
    for k in sd:
        assert torch.equal(two_steps[k], one_step[k]) and torch.equal(back[k], sd[k]) and torch.equal(same[k], sd[k])


def test_spec_from_kwargs_with_lists_is_cached():
    a = permutation_spec("mlp_digits", hidden=[24, 12, 6])
    assert a is permutation_spec("mlp_digits", hidden=(24, 12, 6))
    assert a.group_sizes == {"module_list.1": 24, "module_list.4": 12, "module_list.7": 6}


def test_bad_state_dicts_name_the_key():
    spec = permutation_spec("cnn_digits")
    sd = build_model("cnn_digits").state_dict()
    perms = identity_permutation(spec)
    missing = {k: v for k, v in sd.items() if k != "module_list.3.bias"}
    with pytest.raises(SpecMismatchError, match=r"lacks 'module_list.3.bias'"):
        apply_permutation(missing, spec, perms)
    wrong = dict(sd, **{"module_list.3.weight": torch.zeros(8, 7, 3, 3)})
    with pytest.raises(SpecMismatchError, match=r"'module_list.3.weight' has shape \(8, 7, 3, 3\)"):
        apply_permutation(wrong, spec, perms)
    extra = dict(sd, surplus=torch.zeros(1))
    with pytest.raises(SpecMismatchError, match="surplus"):
        apply_permutation(extra, spec, perms)
    mixed = stack_state_dicts([sd, sd])
    mixed["module_list.0.bias"] = sd["module_list.0.bias"]
    with pytest.raises(SpecMismatchError, match="module_list.0.bias"):
        apply_permutation(mixed, spec, perms)


def test_bad_permutations_are_rejected():
    spec = permutation_spec("cnn_digits")
    sd = build_model("cnn_digits").state_dict()
    perms = identity_permutation(spec)
    with pytest.raises(SpecMismatchError, match="module_list.8"):
        apply_permutation(sd, spec, {g: p for g, p in perms.items() if g != "module_list.8"})
    with pytest.raises(SpecMismatchError, match="not a permutation"):
        apply_permutation(sd, spec, dict(perms, **{"module_list.0": torch.zeros(8, dtype=torch.int64)}))
    with pytest.raises(SpecMismatchError, match=r"shape \(16,\)"):
        apply_permutation(sd, spec, dict(perms, **{"module_list.8": torch.arange(8)}))


def test_unsupported_modules_are_rejected():
    grouped = SequentialNet([nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="grouped convolution module_list.0"):
        spec_for_module(grouped, (4, 3, 3))
    mixing = SequentialNet([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)])
    with pytest.raises(ValueError, match=r"module_list.1 \(LayerNorm\)"):
        spec_for_module(mixing, (4,))
    with pytest.raises(ValueError, match="no permutation spec for a Linear"):
        spec_for_module(nn.Linear(2, 2), (2,))


def test_inconsistent_spec_is_rejected():
    from sane_ray.weights.permutation import PermutedAxis

    with pytest.raises(ValueError, match="'w' axis 0 has size 3"):
        PermutationSpec("toy", {"w": (3, 2)}, {"w": (PermutedAxis("g"), None)}, {"g": 4})
