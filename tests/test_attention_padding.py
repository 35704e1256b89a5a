"""Padding tokens (windows of models shorter than the window) do not reach real tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sane_ray.model import SaneModel, attention, select_attention_backend, tiny
from sane_ray.model.sane import key_padding_mask

CFG = dataclasses.replace(tiny(), window_size=8, max_positions=(64, 16, 16))
REAL = (8, 5, 3)  # real tokens per window; the rest is padding


@pytest.fixture(scope="module")
def model() -> SaneModel:
    torch.manual_seed(0)
    return SaneModel(CFG).eval()


def _padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, ws = len(REAL), CFG.window_size
    token_mask = torch.arange(ws)[None, :] < torch.tensor(REAL)[:, None]
    x = torch.randn(b, ws, CFG.d_t, generator=g) * token_mask[..., None]
    pos = torch.stack([torch.arange(ws)] * 3, dim=-1).expand(b, ws, 3).clone()
    pos[~token_mask] = torch.tensor([63, 15, 15])  # the padding position
    return x, pos, token_mask


def _scramble_padding(x, pos, token_mask, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pad = ~token_mask
    x2 = torch.where(pad[..., None], 10 * torch.randn(x.shape, generator=g), x)
    pos2 = pos.clone()
    pos2[pad] = torch.randint(0, 16, (int(pad.sum()), 3), generator=g)
    return x2, pos2


def test_real_tokens_ignore_padding_content(model):
    x, pos, token_mask = _padded_batch()
    x2, pos2 = _scramble_padding(x, pos, token_mask)
    a, b = model(x, pos, token_mask), model(x2, pos2, token_mask)
    real = token_mask
    torch.testing.assert_close(a.z[real], b.z[real])
    torch.testing.assert_close(a.x_hat[real], b.x_hat[real])
    torch.testing.assert_close(a.projection, b.projection)
    # without the mask padding leaks into the real tokens: the check above can fail
    assert not torch.allclose(model(x, pos).z[real], model(x2, pos2).z[real], atol=1e-4)


def test_padded_window_equals_the_unpadded_window(model):
    x, pos, token_mask = _padded_batch()
    out = model(x, pos, token_mask)
    for i, n in enumerate(REAL):
        alone = model(x[i : i + 1, :n], pos[i : i + 1, :n])
        torch.testing.assert_close(out.z[i, :n], alone.z[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.x_hat[i, :n], alone.x_hat[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.projection[i], alone.projection[0], atol=1e-5, rtol=1e-4)


def test_no_padding_takes_the_mask_free_path(model, monkeypatch):
    seen = []
    real_sdpa = attention.sdpa_attention

    def spy(q, k, v, dropout_p, key_mask=None):
        seen.append(key_mask)
        return real_sdpa(q, k, v, dropout_p, key_mask)

    monkeypatch.setattr(attention, "sdpa_attention", spy)
    x, pos, _ = _padded_batch()
    full = torch.ones(x.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(model(x, pos, full).x_hat, model(x, pos).x_hat)
    assert len(seen) == 4 * CFG.n_layers and all(m is None for m in seen)
    seen.clear()
    model(*_padded_batch())
    assert len(seen) == 2 * CFG.n_layers and all(m is not None for m in seen)


def test_window_without_real_tokens_stays_finite(model):
    x, pos, token_mask = _padded_batch()
    token_mask[2] = False
    assert key_padding_mask(token_mask)[2].all()  # attends to everything rather than to nothing
    out = model(x, pos, token_mask)
    assert all(torch.isfinite(t).all() for t in out)


def test_masked_attention_never_uses_flash_attn(monkeypatch):
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    cuda = torch.device("cuda")
    assert select_attention_backend(cuda, torch.bfloat16) is attention.flash_attention
    assert select_attention_backend(cuda, torch.bfloat16, masked=True) is attention.sdpa_attention
    with pytest.raises(ValueError, match="no key mask"):
        attention.flash_attention(*(torch.zeros(1, 2, 1, 4) for _ in range(3)), 0.0, torch.ones(1, 2, dtype=torch.bool))


def test_token_mask_shape_is_checked(model):
    x, pos, token_mask = _padded_batch()
    with pytest.raises(ValueError, match="token_mask must be a bool tensor"):
        model(x, pos, token_mask[:, :-1])
    with pytest.raises(ValueError, match="token_mask must be a bool tensor"):
        model(x, pos, token_mask.float())
