"""Git re-basin weight matching: function preservation, exact recovery, agreement with the textbook loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sane_ray.weights.align as align
from sane_ray.weights.align import align_model, match_weights, reference_matching, weight_matching
from sane_ray.weights.permutation import (
    SpecMismatchError,
    apply_permutation,
    permutation_spec,
    random_permutation,
    stack_state_dicts,
)
from sane_ray.zoo.architectures import build_model, input_shape

from arch_cases import ARCHS, IDS, trained_like


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


def assert_same_function(arch: str, kw: dict, model: nn.Module, a: dict, b: dict, batch: int = 8) -> None:
    x = torch.randn(batch, *input_shape(arch, **kw), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.load_state_dict(a)
        ya = model(x)
        model.load_state_dict(b)
        yb = model(x)
    assert torch.allclose(ya, yb, rtol=1e-4, atol=1e-5 * float(ya.abs().max()))


@pytest.mark.parametrize("arch,kw", ARCHS, ids=IDS)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_alignment_preserves_function_and_never_moves_away(arch, kw, seed):
    spec = permutation_spec(arch, **kw)
    ref = trained_like(arch, kw, seed).state_dict()
    model = trained_like(arch, kw, seed + 1)
    sd = model.state_dict()
    aligned = apply_permutation(sd, spec, weight_matching(spec, ref, sd, seed=seed))
    assert_same_function(arch, kw, model, sd, aligned)
    assert distance(ref, aligned) <= distance(ref, sd) * (1 + 1e-6)


@pytest.mark.parametrize("arch,kw", ARCHS, ids=IDS)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_permuted_copy_is_recovered_exactly(arch, kw, seed):
    spec = permutation_spec(arch, **kw)
    ref = trained_like(arch, kw, seed).state_dict()
    scrambled = apply_permutation(ref, spec, random_permutation(spec, torch.Generator().manual_seed(seed)))
    recovered = apply_permutation(scrambled, spec, weight_matching(spec, ref, scrambled, seed=seed))
    assert distance(ref, recovered) < 1e-5


@pytest.mark.parametrize(
    "arch,kw,seeds",
    [("cnn_digits_bn", {}, 4), ("resnet18", {"width": 8}, 4), ("resnet18", {"width": 32, "num_classes": 100}, 2),
     ("vit_digits", {}, 4)],
    ids=["cnn_bn", "resnet18", "resnet18_100_classes", "vit"],
)
def test_same_iterates_as_the_textbook_loop(arch, kw, seeds, monkeypatch):
    """Cached and low-rank-corrected contributions and warm-started assignments must not
    change the descent (checked over seeds; BN weights and running stats perturbed)."""
    spec = permutation_spec(arch, **kw)
    corrections, warm = [], []
    original = align._Term.delta
    monkeypatch.setattr(align._Term, "delta", lambda self, *a: corrections.append(1) or original(self, *a))
    original_assign = align.max_assignment
    monkeypatch.setattr(align, "max_assignment", lambda a, prior: warm.append(prior is not None) or original_assign(a, prior))
    for seed in range(seeds):
        ref, sd = trained_like(arch, kw, 10 * seed).state_dict(), trained_like(arch, kw, 10 * seed + 1).state_dict()
        got = match_weights(spec, ref, sd, seed=seed)
        want, sweeps = reference_matching(spec, ref, sd, seed=seed)
        assert got.sweeps == sweeps and got.converged
        assert all(torch.equal(got.perms[g], want[g]) for g in spec.group_sizes)
    if arch in ("resnet18", "vit_digits"):  # the ViT's: across the q/k/v parts of in_proj
        assert corrections, "the low-rank correction path was never exercised"
    if kw.get("width", 0) >= 32:
        assert any(warm), "no assignment was warm-started"


def test_full_width_resnet18_alignment():
    spec = permutation_spec("resnet18")
    ref = trained_like("resnet18", {}, 0).state_dict()
    model = trained_like("resnet18", {}, 1)
    sd = model.state_dict()
    result = match_weights(spec, ref, sd)
    aligned = apply_permutation(sd, spec, result.perms)
    assert result.converged
    assert distance(ref, aligned) < distance(ref, sd)
    assert_same_function("resnet18", {}, model, sd, aligned, batch=2)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "stacked"])
def test_align_model_uses_the_last_epoch_for_all_epochs(stacked):
    spec = permutation_spec("cnn_digits_bn")
    ref = trained_like("cnn_digits_bn", {}, 0).state_dict()
    epochs = [trained_like("cnn_digits_bn", {}, s).state_dict() for s in (5, 6, 7)]
    aligned, perms = align_model(spec, ref, stack_state_dicts(epochs) if stacked else epochs, seed=3)
    want = weight_matching(spec, ref, epochs[-1], seed=3)
    assert all(torch.equal(perms[g], want[g]) for g in spec.group_sizes)
    for i, sd in enumerate(epochs):
        expected = apply_permutation(sd, spec, perms)
        got = {k: v[i] for k, v in aligned.items()} if stacked else aligned[i]
        assert isinstance(aligned, dict) == stacked
        assert all(torch.equal(got[k], expected[k]) for k in sd)


def test_max_sweeps_caps_the_descent():
    spec = permutation_spec("resnet18", width=8)
    ref, sd = (trained_like("resnet18", {"width": 8}, s).state_dict() for s in (0, 1))
    capped = match_weights(spec, ref, sd, max_sweeps=1)
    assert capped.sweeps == 1 and not capped.converged
    with pytest.raises(ValueError, match="max_sweeps"):
        match_weights(spec, ref, sd, max_sweeps=0)


def test_bad_inputs_name_the_key():
    spec = permutation_spec("cnn_digits")
    ref = build_model("cnn_digits").state_dict()
    sd = build_model("cnn_digits").state_dict()
    with pytest.raises(SpecMismatchError, match=r"state dict lacks 'module_list.8.weight'"):
        weight_matching(spec, ref, {k: v for k, v in sd.items() if k != "module_list.8.weight"})
    with pytest.raises(SpecMismatchError, match=r"reference state dict: 'module_list.3.bias' has shape \(9,\)"):
        weight_matching(spec, dict(ref, **{"module_list.3.bias": torch.zeros(9)}), sd)
    bad = dict(sd, **{"module_list.3.weight": sd["module_list.3.weight"].clone()})
    bad["module_list.3.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(SpecMismatchError, match=r"state dict: 'module_list.3.weight' contains NaN"):
        weight_matching(spec, ref, bad)
    with pytest.raises(SpecMismatchError, match="needs one checkpoint"):
        weight_matching(spec, ref, stack_state_dicts([sd, sd]))
    with pytest.raises(SpecMismatchError, match="leading epoch dim"):
        align_model(spec, ref, sd)
