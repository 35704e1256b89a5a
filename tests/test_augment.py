"""Augmentations: random function-preserving permutations (state dicts and tokens) and noise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sane_ray.weights.augment import multiplicative_noise, permute_tokens, random_permute, token_permutation_index
from sane_ray.weights.permutation import (
    SpecMismatchError,
    apply_permutation,
    permutation_spec,
    random_permutation,
    stack_state_dicts,
)
from sane_ray.weights.tokenize import layout_from_state_dict, tokenize, tokenize_stack
from sane_ray.zoo.architectures import build_model, input_shape

from arch_cases import ARCHS, IDS, trained_like


@pytest.mark.parametrize("arch,kw", ARCHS, ids=IDS)
def test_random_permute_preserves_function_for_a_stack(arch, kw):
    model = trained_like(arch, kw, 0)
    epochs = [trained_like(arch, kw, s).state_dict() for s in (0, 1)]
    spec = permutation_spec(arch, **kw)
    permuted = random_permute(stack_state_dicts(epochs), spec, torch.Generator().manual_seed(7))
    x = torch.randn(4, *input_shape(arch, **kw), generator=torch.Generator().manual_seed(1))
    for i, sd in enumerate(epochs):
        with torch.no_grad():
            model.load_state_dict(sd)
            want = model(x)
            model.load_state_dict({k: v[i] for k, v in permuted.items()})
            got = model(x)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert any(not torch.equal(permuted[k][0], epochs[0][k]) for k in spec.permuted_keys)


@pytest.mark.parametrize("arch,kw", ARCHS, ids=IDS)
@pytest.mark.parametrize("include_bn", [False, "affine", True], ids=["no-bn", "bn-affine", "bn"])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), token_size=st.sampled_from([3, 16, 64, 289]), window=st.data())
def test_token_gather_equals_tokenizing_the_permuted_model(arch, kw, include_bn, seed, token_size, window):
    spec = permutation_spec(arch, **kw)
    sd = trained_like(arch, kw, seed % 97).state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(seed))
    tokens = tokenize(sd, token_size, include_bn)
    want = tokenize(apply_permutation(sd, spec, perms), token_size, include_bn).tokens
    assert torch.equal(permute_tokens(tokens.tokens, tokens.layout, spec, perms), want)
    n = tokens.layout.num_tokens
    start = window.draw(st.integers(0, n))
    stop = window.draw(st.integers(start, n))
    assert torch.equal(permute_tokens(tokens.tokens, tokens.layout, spec, perms, start, stop), want[start:stop])


def test_token_gather_on_a_batch_and_index_is_a_permutation():
    spec = permutation_spec("cnn_cifar_public")
    models = [trained_like("cnn_cifar_public", {}, s).state_dict() for s in range(3)]
    perms = random_permutation(spec, torch.Generator().manual_seed(0))
    batch = tokenize_stack(models, 64)
    want = tokenize_stack([apply_permutation(sd, spec, perms) for sd in models], 64).tokens
    assert torch.equal(permute_tokens(batch.tokens, batch.layout, spec, perms, 10, 50), want[:, 10:50])
    index = token_permutation_index(batch.layout, spec, perms)
    assert torch.equal(index.sort().values, torch.arange(batch.layout.num_tokens * 64))
    assert not torch.equal(index, torch.arange(len(index)))


def test_token_gather_errors():
    spec = permutation_spec("cnn_digits")
    sd = build_model("cnn_digits").state_dict()
    layout = layout_from_state_dict(sd, 16)
    perms = random_permutation(spec)
    with pytest.raises(ValueError, match="token range 5:1000"):
        token_permutation_index(layout, spec, perms, 5, 1000)
    with pytest.raises(SpecMismatchError, match=r"tokens have shape \(3, 16\)"):
        permute_tokens(torch.zeros(3, 16), layout, spec, perms)
    other = layout_from_state_dict(build_model("cnn_digits", num_classes=5).state_dict(), 16)
    with pytest.raises(SpecMismatchError, match=r"'module_list.8.weight' has shape"):
        wide = dict(sd, **{"module_list.8.weight": torch.zeros(16, 33)})
        token_permutation_index(layout_from_state_dict(wide, 16), spec, perms)
    with pytest.raises(SpecMismatchError, match=r"'module_list.11.weight' has shape \(5, 16\)"):
        token_permutation_index(other, spec, perms)


def test_multiplicative_noise_statistics():
    x = torch.full((200, 300), 2.0)
    x[:, -10:] = 0  # padding stays zero
    gen = torch.Generator().manual_seed(0)
    y = multiplicative_noise(x, 0.1, gen)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[:, -10:], x[:, -10:])
    rel = y[:, :-10] / 2.0 - 1
    assert abs(float(rel.mean())) < 0.003 and abs(float(rel.std()) - 0.1) < 0.003
    again = multiplicative_noise(x, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    assert torch.equal(multiplicative_noise(x, 0.0), x)
    half = multiplicative_noise(x.bfloat16(), 0.1, gen)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sigma"):
        multiplicative_noise(x, -0.1)
    with pytest.raises(ValueError, match="sigma"):
        multiplicative_noise(x, float("nan"))
