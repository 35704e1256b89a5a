"""Tokenization: exact inverse, agreement with a row-by-row reading of the definition, errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sane_ray.weights.tokenize import (
    LayoutMismatchError,
    TokenLayout,
    detokenize,
    detokenize_stack,
    layout_from_state_dict,
    tokenize,
    tokenize_stack,
)

LAYER_KINDS = ("linear", "conv1d", "conv2d", "conv3d", "batchnorm", "layernorm")


@st.composite
def architectures(draw) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """A random stack of layers as ``(key, shape, dtype)`` in state-dict order."""
    entries = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(LAYER_KINDS))
        c = draw(st.integers(1, 9))
        p = f"features.{i}."
        if kind in ("batchnorm", "layernorm"):
            if kind == "layernorm" or draw(st.booleans()):  # BN may be affine-free
                entries += [(p + "weight", (c,), torch.float32), (p + "bias", (c,), torch.float32)]
            if kind == "batchnorm":
                entries += [(p + "running_mean", (c,), torch.float32), (p + "running_var", (c,), torch.float32),
                            (p + "num_batches_tracked", (), torch.int64)]
            continue
        dims = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}[kind]
        kernel = tuple(draw(st.integers(1, 4 if dims < 3 else 3)) for _ in range(dims))
        entries.append((p + "weight", (c, draw(st.integers(1, 9)), *kernel), torch.float32))
        if draw(st.booleans()):
            entries.append((p + "bias", (c,), torch.float32))
    return entries


def make_state_dict(arch, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=g) if dtype.is_floating_point else torch.randint(0, 99, shape, generator=g)
        for key, shape, dtype in arch
    }


def naive_tokenize(sd: dict[str, torch.Tensor], d: int, include_bn: bool):
    """The definition read literally: row by row, chunk by chunk (test oracle)."""
    bn = {k.rsplit(".", 1)[0] for k in sd if k.endswith(("running_mean", "running_var"))}
    toks, masks, pos, layer = [], [], [], 0
    for key, value in sd.items():
        prefix, name = key.rsplit(".", 1)
        if name == "num_batches_tracked" or (prefix in bn and not include_bn):
            continue
        if name == "bias" and prefix + ".weight" in sd:
            continue
        rows = value.reshape(value.shape[0], -1)
        if name == "weight" and prefix + ".bias" in sd:
            rows = torch.cat([rows, sd[prefix + ".bias"][:, None]], dim=1)
        for k, row in enumerate(rows):
            for chunk in row.split(d):
                t, m = torch.zeros(d), torch.zeros(d, dtype=torch.bool)
                t[: len(chunk)], m[: len(chunk)] = chunk, True
                pos.append((len(toks), layer, k))
                toks.append(t)
                masks.append(m)
        layer += 1
    return torch.stack(toks), torch.stack(masks), torch.tensor(pos, dtype=torch.int64)


def aside_keys(sd, include_bn: bool) -> list[str]:
    bn = {k.rsplit(".", 1)[0] for k in sd if k.endswith("running_mean")}
    return [k for k in sd if k.endswith("num_batches_tracked") or (not include_bn and k.rsplit(".", 1)[0] in bn)]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(arch=architectures(), d=st.integers(1, 300), include_bn=st.booleans(), seed=st.integers(0, 2**16))
def test_tokens_follow_the_definition(arch, d, include_bn, seed):
    sd = make_state_dict(arch, seed)
    aside = aside_keys(sd, include_bn)
    if len(aside) == len(sd):  # nothing left to tokenize: covered by test_only_aside_tensors
        return
    t = tokenize(sd, d, include_bn)
    tokens, mask, pos = naive_tokenize(sd, d, include_bn)
    assert t.tokens.dtype == torch.float32 and t.mask.dtype == torch.bool and t.pos.dtype == torch.int64
    assert torch.equal(t.tokens, tokens)
    assert torch.equal(t.mask, mask)
    assert torch.equal(t.pos, pos)
    assert int(t.mask.sum()) == sum(sd[k].numel() for k in sd if k not in aside)
    assert (t.tokens[~t.mask] == 0).all()
    assert list(t.bn_state) == aside
    assert t.layout.num_tokens == len(tokens)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(arch=architectures(), d=st.integers(1, 300), include_bn=st.booleans(), seed=st.integers(0, 2**16))
def test_detokenize_is_exact(arch, d, include_bn, seed):
    sd = make_state_dict(arch, seed)
    t = tokenize(sd, d, include_bn)
    full = detokenize(t.tokens, t.layout, bn_state=t.bn_state)
    assert list(full) == list(sd)
    for key, value in sd.items():
        assert full[key].dtype == value.dtype and torch.equal(full[key], value), key
    # Without bn_state, only the tokenized keys come back; the layout survives JSON and
    # can be rebuilt from shapes alone or from a reference state dict.
    layout = TokenLayout.from_json(json.dumps(json.loads(t.layout.to_json())))
    assert layout == t.layout == layout_from_state_dict({k: v.shape for k, v in sd.items()}, d, include_bn)
    partial = detokenize(t.tokens, layout)
    assert list(partial) == [k for k in sd if k not in t.bn_state]
    by_reference = detokenize(t.tokens, sd, include_bn=include_bn)
    assert all(torch.equal(by_reference[k], sd[k]) for k in partial)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(arch=architectures(), d=st.integers(1, 300), include_bn=st.booleans(), seed=st.integers(0, 2**16))
def test_stack_equals_single_models(arch, d, include_bn, seed):
    models = [make_state_dict(arch, seed + i) for i in range(3)]
    singles = [tokenize(sd, d, include_bn) for sd in models]
    stacked_input = {k: torch.stack([sd[k] for sd in models]) for k in models[0]}
    for t in (tokenize_stack(models, d, include_bn), tokenize_stack(stacked_input, d, include_bn)):
        assert torch.equal(t.tokens, torch.stack([s.tokens for s in singles]))
        assert torch.equal(t.mask, singles[0].mask) and torch.equal(t.pos, singles[0].pos)
        assert t.layout == singles[0].layout
        back = detokenize_stack(t.tokens, t.layout, bn_state=t.bn_state)
        assert list(back) == list(stacked_input)
        assert all(torch.equal(back[k], stacked_input[k]) for k in back)


def test_only_aside_tensors():
    sd = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3),
          "bn.num_batches_tracked": torch.tensor(5)}
    t = tokenize(sd, 4)
    assert t.tokens.shape == (0, 4) and t.pos.shape == (0, 3)
    assert list(detokenize(t.tokens, t.layout, bn_state=t.bn_state)) == list(sd)


def test_bn_is_aside_by_default_and_three_layers_when_included():
    sd = {
        "conv.weight": torch.randn(4, 2, 3, 3), "bn.weight": torch.rand(4), "bn.bias": torch.randn(4),
        "bn.running_mean": torch.randn(4), "bn.running_var": torch.rand(4),
        "bn.num_batches_tracked": torch.tensor(7), "ln.weight": torch.rand(4), "ln.bias": torch.randn(4),
    }
    t = tokenize(sd, 10)
    assert list(t.bn_state) == [k for k in sd if k.startswith("bn.")]
    # LayerNorm has no running statistics: it is a regular tokenized layer.
    assert [s.key for s in t.layout.layers] == ["conv.weight", "ln.weight"]
    assert t.layout.layers[1].bias_key == "ln.bias"
    t_bn = tokenize(sd, 10, include_bn=True)
    assert list(t_bn.bn_state) == ["bn.num_batches_tracked"]
    assert [s.key for s in t_bn.layout.layers] == [
        "conv.weight", "bn.weight", "bn.running_mean", "bn.running_var", "ln.weight"]
    assert t_bn.layout.num_tokens == 4 * 2 + 4 * 3 + 4
    assert t_bn.pos[:, 1].max() == 4
    t_affine = tokenize(sd, 10, include_bn="affine")
    assert list(t_affine.bn_state) == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert [(s.key, s.bias_key) for s in t_affine.layout.layers] == [
        ("conv.weight", None), ("bn.weight", "bn.bias"), ("ln.weight", "ln.bias")]
    back = detokenize(t_affine.tokens, t_affine.layout, bn_state=t_affine.bn_state)
    assert list(back) == list(sd) and all(torch.equal(back[k].to(sd[k].dtype), sd[k]) for k in sd)
    assert TokenLayout.from_json(t_affine.layout.to_json()) == t_affine.layout
    with pytest.raises(ValueError, match="include_bn must be one of"):
        tokenize(sd, 10, include_bn="running")


def test_unpaired_and_scalar_tensors_are_their_own_layers():
    sd = {
        "head.bias": torch.randn(3), "head.weight": torch.randn(3, 5),  # bias listed first
        "gate.bias": torch.randn(2),  # no weight to pair with
        "scale": torch.tensor(0.5),  # 0-d parameter
        "proj.weight": torch.randn(4, 3), "proj.bias": torch.randn(3),  # bias does not fit c_out
    }
    t = tokenize(sd, 4)
    assert [(s.key, s.bias_key) for s in t.layout.layers] == [
        ("head.weight", "head.bias"), ("gate.bias", None), ("scale", None), ("proj.weight", None), ("proj.bias", None)]
    back = detokenize(t.tokens, t.layout)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_dtypes_are_float32_and_tokens_are_copies():
    sd = {"fc.weight": torch.randn(3, 4, dtype=torch.float64), "fc.bias": torch.randn(3, dtype=torch.float16)}
    t = tokenize(sd, 8)
    assert t.tokens.dtype == torch.float32
    back = detokenize(t.tokens.to(torch.bfloat16), t.layout)
    assert all(v.dtype == torch.float32 for v in back.values())
    back = detokenize(t.tokens, t.layout)
    t.tokens.zero_()
    assert torch.equal(back["fc.weight"], sd["fc.weight"].float())


@pytest.mark.parametrize(
    "num_classes, include_bn, expected",
    [(10, False, 39124), (10, True, 53524), (100, False, 39304), (100, True, 53704)],
)
def test_resnet18_token_counts(num_classes, include_bn, expected):
    from sane_ray.zoo.architectures import build_model

    with torch.device("meta"):
        sd = build_model("resnet18", num_classes=num_classes).state_dict()
    assert layout_from_state_dict(sd, 288, include_bn).num_tokens == expected


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_token_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="token_size"):
        tokenize({"w": torch.ones(2, 2)}, bad)


def test_errors_name_the_key_and_shapes():
    sd = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}
    layout = layout_from_state_dict(sd, 4)
    with pytest.raises(TypeError, match="'fc.weight'.*int64"):
        tokenize({"fc.weight": torch.ones(3, 4, dtype=torch.int64)}, 4)
    with pytest.raises(LayoutMismatchError, match=r"'fc.weight' has shape \(3, 5\), the layout expects \(3, 4\)"):
        tokenize_stack([sd, {"fc.weight": torch.randn(3, 5), "fc.bias": torch.randn(3)}], 4)
    with pytest.raises(LayoutMismatchError, match=r"model 1 .*missing \['fc.bias'\]"):
        tokenize_stack([sd, {"fc.weight": torch.randn(3, 4)}], 4)
    with pytest.raises(LayoutMismatchError, match=r"tokens have shape \(5, 4\), the layout needs \(6, 4\)"):
        detokenize(torch.zeros(5, 4), layout)
    with pytest.raises(LayoutMismatchError, match="needs"):
        detokenize(torch.zeros(1, 6, 4), layout)
    bn = {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2), "w": torch.ones(1)}
    t = tokenize(bn, 2)
    with pytest.raises(LayoutMismatchError, match="bn_state lacks 'bn.running_var'"):
        detokenize(t.tokens, t.layout, bn_state={"bn.running_mean": torch.zeros(2)})
    with pytest.raises(ValueError, match="not a sane-ray/token-layout"):
        TokenLayout.from_dict({"format": "other"})
