"""Per-layer standardization: streaming and merged stats equal one-shot stats; exact inverses."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sane_ray.weights.standardize import Moments, StandardizationStats
from sane_ray.weights.tokenize import detokenize, tokenize


@st.composite
def architectures(draw) -> list[tuple[str, tuple[int, ...]]]:
    """Random conv/linear/BN stacks as ``(key, shape)``; BN adds running stats and a counter."""
    entries = []
    for i in range(draw(st.integers(1, 5))):
        c, p = draw(st.integers(1, 8), label="channels"), f"net.{i}."
        kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "batchnorm"]))
        if kind == "batchnorm":
            entries += [(p + n, (c,)) for n in ("weight", "bias", "running_mean", "running_var")]
            entries.append((p + "num_batches_tracked", ()))
            continue
        kernel = tuple(draw(st.integers(1, 3)) for _ in range({"linear": 0, "conv1d": 1, "conv2d": 2}[kind]))
        entries.append((p + "weight", (c, draw(st.integers(1, 8)), *kernel)))
        if draw(st.booleans()):
            entries.append((p + "bias", (c,)))
    return entries


def make_models(arch, seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` models whose layers have different offsets and scales per model and per layer."""
    g = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(n):
        sd = {}
        for key, shape in arch:
            if key.endswith("num_batches_tracked"):
                sd[key] = torch.randint(0, 50, shape, generator=g)
            else:
                scale, shift = torch.rand((), generator=g) * 3, torch.randn((), generator=g)
                sd[key] = torch.randn(shape, generator=g) * scale + shift
        models.append(sd)
    return models


def one_shot_moments(models, key: str) -> tuple[float, float]:
    values = torch.cat([sd[key].double().flatten() for sd in models])
    return float(values.mean()), float(values.var(unbiased=False))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(arch=architectures(), n=st.integers(1, 6), include_bn=st.booleans(), seed=st.integers(0, 2**16),
       data=st.data())
def test_streaming_and_merged_stats_equal_one_shot(arch, n, include_bn, seed, data):
    models = make_models(arch, seed, n)
    streamed = StandardizationStats.from_models(models, include_bn)
    split = data.draw(st.integers(0, n), label="split")
    merged = StandardizationStats.from_models(models[:split], include_bn).merge(
        StandardizationStats.from_models(models[split:], include_bn))
    stacked = StandardizationStats(include_bn).update({k: torch.stack([sd[k] for sd in models]) for k in models[0]},
                                                      stacked=True)
    expected_keys = tokenize(models[0], 7, include_bn).layout.layers
    for stats in (streamed, merged, stacked):
        assert list(stats.layers) == [s.key for s in expected_keys]
        for key in stats.layers:
            mean, var = one_shot_moments(models, key)
            assert stats.layers[key].count == n * models[0][key].numel()
            assert stats.mean(key) == pytest.approx(mean, rel=1e-9, abs=1e-12)
            assert stats.layers[key].var == pytest.approx(var, rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(arch=architectures(), include_bn=st.booleans(), seed=st.integers(0, 2**16), d=st.integers(1, 100))
def test_apply_and_invert_on_state_dicts_and_tokens(arch, include_bn, seed, d):
    train = make_models(arch, seed, 4)
    stats = StandardizationStats.from_json(StandardizationStats.from_models(train, include_bn).to_json())
    standardized = [stats.apply(sd) for sd in train]
    t = tokenize(train[0], d, include_bn)
    for key in stats.layers:  # the training set is standardized per layer
        values = torch.cat([sd[key].double().flatten() for sd in standardized])
        assert float(values.mean()) == pytest.approx(0.0, abs=1e-5)
        if stats.std(key) > 1e-3:
            assert float(values.std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)
    sd, std_sd = train[0], standardized[0]
    assert list(std_sd) == list(sd)
    for key in t.bn_state:  # kept-aside tensors pass through untouched
        assert std_sd[key] is sd[key]
    for layer in t.layout.layers:  # a bias uses its weight's statistics
        if layer.bias_key:
            expected = (sd[layer.bias_key] - stats.mean(layer.key)) / stats.std(layer.key)
            assert torch.allclose(std_sd[layer.bias_key], expected)
    back = stats.invert(std_sd)
    assert all(torch.allclose(back[k].double(), sd[k].double(), rtol=1e-5, atol=1e-5) for k in sd)
    stacked = stats.apply({k: torch.stack([m[k] for m in train]) for k in sd}, stacked=True)
    assert all(torch.equal(stacked[k][i], standardized[i][k]) for k in sd for i in range(len(train)))
    # On tokens: same values as standardizing the state dict first, padding stays zero.
    std_tokens = stats.apply_tokens(t.tokens, t.layout)
    assert torch.allclose(std_tokens, tokenize(std_sd, d, include_bn).tokens, rtol=1e-5, atol=1e-5)
    assert (std_tokens[~t.mask] == 0).all()
    restored = stats.invert_tokens(std_tokens, t.layout)
    assert torch.allclose(restored, t.tokens, rtol=1e-5, atol=1e-5)
    decoded = detokenize(restored, t.layout)
    assert all(torch.allclose(decoded[k], sd[k], rtol=1e-5, atol=1e-5) for k in decoded)
    restored_stack = stats.invert_tokens(torch.stack([std_tokens, std_tokens]), t.layout)
    assert torch.equal(restored_stack[1], restored)


def test_pooled_variance_includes_spread_between_models():
    models = [{"fc.weight": torch.tensor([[-1.0, 1.0]])}, {"fc.weight": torch.tensor([[9.0, 11.0]])}]
    stats = StandardizationStats.from_models(models)
    assert stats.mean("fc.weight") == 5.0
    assert stats.std("fc.weight") == pytest.approx(math.sqrt(26.0))  # within-model var 1 + between-model var 25


def test_moments_merge_with_empty():
    m = Moments.of(torch.tensor([1.0, 2.0, 4.0]))
    empty = Moments.of(torch.tensor([]))
    assert m.merged(empty) == m and empty.merged(m) == m
    assert m.var == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).var(unbiased=False).item())


def test_std_floor_keeps_constant_layers_finite():
    models = [{"fc.weight": torch.full((2, 3), 0.25), "fc.bias": torch.full((2,), 0.25)}] * 3
    stats = StandardizationStats.from_models(models, std_floor=1e-4)
    assert stats.std("fc.weight") == 1e-4
    out = stats.apply(models[0])
    assert torch.equal(out["fc.weight"], torch.zeros(2, 3))
    assert torch.allclose(stats.invert(out)["fc.weight"], models[0]["fc.weight"])
    with pytest.raises(ValueError, match="std_floor"):
        StandardizationStats(std_floor=0.0)


def test_clear_errors():
    stats = StandardizationStats.from_models([{"a.weight": torch.randn(2, 2)}])
    with pytest.raises(KeyError, match="no layer 'b.weight'.*a.weight"):
        stats.apply({"a.weight": torch.randn(2, 2), "b.weight": torch.randn(2, 2)})
    t = tokenize({"b.weight": torch.randn(2, 2)}, 4)
    with pytest.raises(KeyError, match="no layer 'b.weight'"):
        stats.invert_tokens(t.tokens, t.layout)
    with pytest.raises(ValueError, match="include_bn"):
        stats.merge(StandardizationStats(include_bn=True))
    with pytest.raises(TypeError, match="'a.weight'.*not floating"):
        StandardizationStats().update({"a.weight": torch.ones(2, 2, dtype=torch.int32)})
    with pytest.raises(ValueError, match="not a sane-ray/standardization"):
        StandardizationStats.from_dict({"format": "x"})
