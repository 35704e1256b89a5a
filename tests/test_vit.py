"""The tiny ViT: torchvision's key names, seeded init, its permutation symmetries, tokens and alignment."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sane_ray.weights.align import match_weights
from sane_ray.weights.permutation import (
    apply_permutation,
    identity_permutation,
    invert,
    permutation_spec,
    random_permutation,
)
from sane_ray.weights.tokenize import detokenize, tokenize
from sane_ray.zoo.architectures import Architecture, build_model, vit_digits

from arch_cases import trained_like

HEADS0 = "encoder.layers.encoder_layer_0.self_attention"


def torchvision_shapes(d: int, layers: int, mlp: int, patch: int, classes: int = 10) -> dict[str, tuple[int, ...]]:
    """torchvision's ``VisionTransformer`` state dict (keys in its order) for a 1-channel 8x8 input."""
    shapes = {"class_token": (1, 1, d), "conv_proj.weight": (d, 1, patch, patch), "conv_proj.bias": (d,),
              "encoder.pos_embedding": (1, (8 // patch) ** 2 + 1, d)}
    for i in range(layers):
        p = f"encoder.layers.encoder_layer_{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "self_attention.in_proj_weight": (3 * d, d), p + "self_attention.in_proj_bias": (3 * d,),
            p + "self_attention.out_proj.weight": (d, d), p + "self_attention.out_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.0.weight": (mlp, d), p + "mlp.0.bias": (mlp,), p + "mlp.3.weight": (d, mlp), p + "mlp.3.bias": (d,),
        })
    shapes.update({"encoder.ln.weight": (d,), "encoder.ln.bias": (d,), "heads.head.weight": (classes, d),
                   "heads.head.bias": (classes,)})
    return shapes


def outputs(model: nn.Module, sd: dict, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(sd)
    with torch.no_grad():
        return model(x)


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_keys_and_shapes_are_torchvisions():
    got = {k: tuple(v.shape) for k, v in build_model("vit_digits").state_dict().items()}
    assert list(got.items()) == list(torchvision_shapes(32, 2, 64, 4).items())
    assert sum(p.numel() for p in build_model("vit_digits").parameters()) == 18_218
    wider = build_model("vit_digits", patch_size=2, hidden_dim=16, num_layers=3, mlp_dim=24, num_classes=5)
    assert {k: tuple(v.shape) for k, v in wider.state_dict().items()} == torchvision_shapes(16, 3, 24, 2, 5)


def test_init_is_seeded_and_bad_arguments_are_refused():
    def draw(seed: int) -> dict:
        torch.manual_seed(seed)
        return build_model("vit_digits", activation="relu").state_dict()

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.pos_embedding"], c["encoder.pos_embedding"])
    assert isinstance(build_model("vit_digits", activation="relu").encoder.layers[0].mlp[1], nn.ReLU)
    with pytest.raises(ValueError, match="patch_size must divide the image size 8, got 3"):
        build_model("vit_digits", patch_size=3)
    with pytest.raises(ValueError, match="num_heads must divide hidden_dim 32, got 5"):
        build_model("vit_digits", num_heads=5)
    with pytest.raises(ValueError, match=r"expected 8x8 images, got \(2, 1, 7, 7\)"):
        build_model("vit_digits")(torch.zeros(2, 1, 7, 7))
    with pytest.raises(ValueError, match="unknown family 'transformer'"):
        Architecture("x", vit_digits, (1, 8, 8), "transformer")


def test_head_permutation_moves_q_k_v_rows_and_out_proj_columns_together():
    model = trained_like("vit_digits", {}, 0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spec = permutation_spec("vit_digits")
    assert spec.group_sizes == {
        "stream.conv_proj": 32, HEADS0: 4, "encoder.layers.encoder_layer_0.mlp.0": 64,
        "encoder.layers.encoder_layer_1.self_attention": 4, "encoder.layers.encoder_layer_1.mlp.0": 64,
    }
    p = torch.tensor([2, 0, 3, 1])
    out = apply_permutation(sd, spec, dict(identity_permutation(spec), **{HEADS0: p}))
    # in_proj rows are (q | k | v) x head x head_dim; out_proj columns are head x head_dim
    assert torch.equal(out[f"{HEADS0}.in_proj_weight"].view(3, 4, 8, 32), sd[f"{HEADS0}.in_proj_weight"].view(3, 4, 8, 32)[:, p])
    assert torch.equal(out[f"{HEADS0}.in_proj_bias"].view(3, 4, 8), sd[f"{HEADS0}.in_proj_bias"].view(3, 4, 8)[:, p])
    assert torch.equal(out[f"{HEADS0}.out_proj.weight"].view(32, 4, 8), sd[f"{HEADS0}.out_proj.weight"].view(32, 4, 8)[:, p])
    moved = {k for k in sd if not torch.equal(out[k], sd[k])}
    assert moved == {f"{HEADS0}.in_proj_weight", f"{HEADS0}.in_proj_bias", f"{HEADS0}.out_proj.weight"}
    x = images()
    assert (outputs(model, out, x) - outputs(model, sd, x)).abs().max() < 1e-5
    q_only = dict(sd)  # the heads of q alone moved: no longer the same function
    q_only[f"{HEADS0}.in_proj_weight"] = torch.cat([out[f"{HEADS0}.in_proj_weight"][:32], sd[f"{HEADS0}.in_proj_weight"][32:]])
    assert (outputs(model, q_only, x) - outputs(model, sd, x)).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [{}, {"patch_size": 2, "num_heads": 8, "num_layers": 3}], ids=["default", "patch2"])
def test_random_heads_mlp_and_stream_permutation_keeps_the_outputs(kw):
    model = trained_like("vit_digits", kw, 1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spec = permutation_spec("vit_digits", **kw)
    x = images()
    want = outputs(model, sd, x)
    for seed in range(3):
        permuted = apply_permutation(sd, spec, random_permutation(spec, torch.Generator().manual_seed(seed)))
        assert all(not torch.equal(permuted[k], sd[k]) for k in spec.permuted_keys)
        assert (outputs(model, permuted, x) - want).abs().max() < 1e-5
    assert set(spec.permuted_keys) == set(sd) - {"heads.head.bias"}  # only the logits' order is fixed


def test_alignment_of_a_permuted_copy_finds_the_inverse_permutation():
    """(Agreement with the textbook loop on unrelated ViTs: tests/test_align.py.)"""
    spec = permutation_spec("vit_digits")
    ref = trained_like("vit_digits", {}, 2).state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(5))
    scrambled = apply_permutation(ref, spec, perms)
    found = match_weights(spec, ref, scrambled, seed=1)
    assert found.converged
    assert all(torch.equal(found.perms[g], invert(perms)[g]) for g in spec.group_sizes)
    recovered = apply_permutation(scrambled, spec, found.perms)
    assert all(torch.equal(recovered[k], ref[k]) for k in ref)


@pytest.mark.parametrize("token_size, count", [(32, 1178), (64, 718)])
def test_tokens_round_trip_exactly(token_size, count):
    sd = trained_like("vit_digits", {}, 4).state_dict()
    tokens = tokenize(sd, token_size)
    layers = {s.key: s for s in tokens.layout.layers}
    assert tokens.layout.num_tokens == count and len(layers) == 17 and tokens.bn_state == {}
    attn = layers[f"{HEADS0}.in_proj_weight"]  # q, k, v rows with their bias column
    assert (attn.bias_key, attn.rows, attn.row_len) == (f"{HEADS0}.in_proj_bias", 96, 33)
    assert (layers["class_token"].rows, layers["encoder.pos_embedding"].row_len) == (1, 5 * 32)
    assert layers["encoder.ln.weight"].bias_key == "encoder.ln.bias"  # LayerNorm: one token per hidden unit
    back = detokenize(tokens.tokens, tokens.layout)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert torch.equal(tokenize(sd, token_size, include_bn=True).tokens, tokens.tokens)  # no BatchNorm to differ
