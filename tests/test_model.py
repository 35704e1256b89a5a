"""The SANE autoencoder: shapes, position checks, init, optimizer groups, attention backends."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sane_ray.config import from_dict
from sane_ray.model import (
    MODEL_PRESETS,
    PositionOutOfRangeError,
    SaneConfig,
    SaneModel,
    configure_optimizer,
    preset,
    select_attention_backend,
    tiny,
)
from sane_ray.model import attention


def _inputs(cfg: SaneConfig, b: int = 3, ws: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ws = ws or cfg.window_size
    x = torch.randn(b, ws, cfg.d_t, generator=g)
    hi = torch.tensor(cfg.max_positions)
    pos = (torch.rand(b, ws, 3, generator=g) * hi).long()
    return x, pos


@pytest.fixture(scope="module")
def model() -> SaneModel:
    torch.manual_seed(0)
    return SaneModel(tiny()).eval()


def test_forward_shapes(model):
    cfg = model.cfg
    x, pos = _inputs(cfg)
    out = model(x, pos)
    assert out.z.shape == (3, cfg.window_size, cfg.d_z)
    assert out.x_hat.shape == x.shape
    assert out.projection.shape == (3, cfg.projection_dim)
    assert torch.equal(model.encode(x, pos), out.z)
    assert torch.equal(model.decode(out.z, pos), out.x_hat)


def test_any_window_length(model):
    for ws in (1, 5, 40):
        x, pos = _inputs(model.cfg, ws=ws)
        assert model(x, pos).projection.shape == (3, model.cfg.projection_dim)


def test_attention_is_not_causal(model):
    x, pos = _inputs(model.cfg, b=1)
    x2 = x.clone()
    x2[0, -1] += 1.0
    assert not torch.allclose(model.encode(x, pos)[0, 0], model.encode(x2, pos)[0, 0])


def test_projection_ignores_padding_tokens(model):
    x, pos = _inputs(model.cfg, b=2)
    token_mask = torch.ones(2, x.shape[1], dtype=torch.bool)
    token_mask[:, -4:] = False
    z = model.encode(x, pos)
    z_changed = z.clone()
    z_changed[:, -4:] = 100.0
    assert torch.allclose(model.project(z, token_mask), model.project(z_changed, token_mask))
    assert not torch.allclose(model.project(z), model.project(z_changed))


@pytest.mark.parametrize("coord,name", [(0, "n (token index)"), (1, "l (layer index)"), (2, "k (row index)")])
def test_position_out_of_range(model, coord, name):
    x, pos = _inputs(model.cfg)
    pos[1, 2, coord] = model.cfg.max_positions[coord]
    with pytest.raises(PositionOutOfRangeError, match=re.escape(name)) as err:
        model(x, pos)
    assert "SaneConfig.max_positions" in str(err.value)


def test_negative_position(model):
    x, pos = _inputs(model.cfg)
    pos[0, 0, 1] = -1
    with pytest.raises(PositionOutOfRangeError, match="non-negative"):
        model.encode(x, pos)


def test_bad_shapes_name_the_setting(model):
    x, pos = _inputs(model.cfg)
    with pytest.raises(ValueError, match="SaneConfig.d_t"):
        model.encode(x[..., :-1], pos)
    with pytest.raises(ValueError, match="positions must have shape"):
        model.encode(x, pos[:, :-1])


def test_init_scales():
    cfg = SaneConfig(d_t=16, window_size=8, d_model=256, d_z=16, n_layers=4, n_heads=4)
    torch.manual_seed(0)
    m = SaneModel(cfg)
    resid = torch.cat([torch.cat([b.out_proj.weight.flatten(), b.fc_out.weight.flatten()]) for b in m.transformer_blocks()])
    qkv = torch.cat([b.qkv.weight.flatten() for b in m.transformer_blocks()])
    assert resid.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert qkv.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.encoder.pos.n.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(m.encoder.inp.bias) == 0 and torch.count_nonzero(m.head.fc2.bias) == 0
    assert all(b.qkv.bias is None and b.ln1.bias is None for b in m.transformer_blocks())


def test_position_embedding_halves(model):
    pe = model.encoder.pos
    pos = torch.tensor([[[3, 2, 5]]])
    half = model.cfg.d_model // 2
    out = pe(pos)[0, 0]
    assert torch.allclose(out[:half], pe.n.weight[3] + pe.l.weight[2])
    assert torch.allclose(out[half:], pe.k.weight[5])


def test_configure_optimizer_decays_only_matrices(model):
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["betas"] == (0.9, 0.99)


def test_config_validation_and_loading():
    with pytest.raises(ValueError, match="n_heads"):
        SaneConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="max_positions"):
        SaneConfig(max_positions=(10, 0, 10))
    cfg = from_dict(SaneConfig, {"d_model": 128, "max_positions": [10, 20, 30]})
    assert cfg.max_positions == (10, 20, 30) and cfg.d_model == 128
    with pytest.raises(ValueError, match="unknown SANE preset"):
        preset("huge")
    assert preset("reference") == SaneConfig()
    assert {n: (c := f()).d_model for n, f in MODEL_PRESETS.items()} == {
        "tiny": 64, "reference": 256, "small_cnn": 1024, "resnet": 2048
    }
    assert (c.d_t, c.window_size, c.n_layers) == (288, 256, 8)


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert select_attention_backend(cuda, torch.bfloat16) is attention.flash_attention
    assert select_attention_backend(cuda, torch.float16) is attention.flash_attention
    assert select_attention_backend(cuda, torch.float32) is attention.sdpa_attention
    assert select_attention_backend(cpu, torch.bfloat16) is attention.sdpa_attention
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert select_attention_backend(cuda, torch.bfloat16) is attention.sdpa_attention


def test_sdpa_backend_matches_naive_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=g) for _ in range(3))  # (B, T, H, Dh)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / 2.0
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    assert torch.allclose(attention.sdpa_attention(q, k, v, 0.0), expected, atol=1e-6)


@pytest.mark.parametrize("d_in,d_out", [(16, 12), (12, 16)])  # both weight-gradient orientations
def test_onednn_linear_matches_float64_reference(d_in, d_out):
    from sane_ray.model.linear import linear, use_onednn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, d_in, generator=g, dtype=torch.float64)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 5, d_out, generator=g, dtype=torch.float64)
    xf, wf, bf = (t.float().requires_grad_() for t in (x, w, b))
    linear(xf, wf, bf).backward(grad.float())
    xd, wd, bd = (t.clone().requires_grad_() for t in (x, w, b))
    torch.nn.functional.linear(xd, wd, bd).backward(grad)
    for got, want in ((xf.grad, xd.grad), (wf.grad, wd.grad), (bf.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert not use_onednn(x, w)  # float64 takes the plain path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(xf, wf)
