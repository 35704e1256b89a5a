"""SANE losses against direct, loop-based definitions on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from sane_ray.model import masked_mse, nt_xent, sane_loss


def _naive_nt_xent(p_i: torch.Tensor, p_j: torch.Tensor, t: float) -> float:
    z = torch.cat([p_i, p_j]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    b = n2 // 2
    total = 0.0
    for a in range(n2):
        pos = a + b if a < b else a - b
        denom = sum(math.exp(float(z[a] @ z[c]) / t) for c in range(n2) if c != a)
        total += -math.log(math.exp(float(z[a] @ z[pos]) / t) / denom)
    return total / n2


def test_masked_mse_counts_real_entries_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = torch.tensor([[1.0, 0.0, 9.0], [4.0, 7.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert masked_mse(x, y, mask).item() == pytest.approx((0 + 4 + 0 + 4) / 4)
    assert masked_mse(x, y, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="equal shapes"):
        masked_mse(x, y[:, :2], mask)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_naive_loop(t):
    g = torch.Generator().manual_seed(0)
    p_i, p_j = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    assert nt_xent(p_i, p_j, t).item() == pytest.approx(_naive_nt_xent(p_i, p_j, t), rel=1e-5)


def test_nt_xent_with_gathered_keys_averages_to_global_loss():
    g = torch.Generator().manual_seed(1)
    all_i, all_j = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    per_block = [
        nt_xent(all_i[o:o + 2], all_j[o:o + 2], 0.2, keys=(all_i, all_j), offset=o) for o in (0, 2, 4)
    ]
    assert torch.stack(per_block).mean().item() == pytest.approx(_naive_nt_xent(all_i, all_j, 0.2), rel=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        nt_xent(all_i[:2], all_j[:2], 0.2, keys=(all_i, all_j), offset=5)


def test_nt_xent_rewards_matching_views():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(8, 16, generator=g)
    assert nt_xent(p, p + 0.01 * torch.randn(8, 16, generator=g), 0.1) < nt_xent(p, torch.randn(8, 16, generator=g), 0.1)


def test_sane_loss_combines_parts():
    g = torch.Generator().manual_seed(3)
    x_hat, target = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    mask = torch.rand(4, 3, 5, generator=g) > 0.3
    p_i, p_j = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    parts = sane_loss(x_hat, target, mask, p_i, p_j, gamma=0.05, temperature=0.1)
    assert parts.reconstruction.item() == pytest.approx(masked_mse(x_hat, target, mask).item())
    assert parts.contrastive.item() == pytest.approx(nt_xent(p_i, p_j, 0.1).item())
    assert parts.total.item() == pytest.approx(0.05 * parts.contrastive.item() + 0.95 * parts.reconstruction.item())
    # a gather that returns the local block unchanged is the same as no gather
    same = sane_loss(x_hat, target, mask, p_i, p_j, 0.05, 0.1, gather=lambda t: (t, 0))
    assert same.total.item() == pytest.approx(parts.total.item())
