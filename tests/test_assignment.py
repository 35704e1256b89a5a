"""Warm-started assignments: the dense solver's optimum, with a proof, from good or bad prices."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from sane_ray.weights.assignment import Duals, max_assignment, prove_optimal


def dense(a: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(linear_sum_assignment(a.numpy(), maximize=True)[1]).long()


@pytest.mark.parametrize("n", [130, 256])
def test_warm_start_finds_the_dense_optimum_and_proves_it(n):
    gen = torch.Generator().manual_seed(n)
    # low rank plus noise, like weight-matching similarities: a few units dominate
    base = torch.randn(n, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, n, generator=gen, dtype=torch.float64)
    a = base + torch.randn(n, n, generator=gen, dtype=torch.float64)
    cols, duals = max_assignment(a)
    assert torch.equal(cols, dense(a)) and duals is not None
    assert (a - duals.row[:, None] - duals.col[None, :]).max() <= 1e-9  # dual feasible ...
    assert torch.allclose(duals.row + duals.col[cols], a[torch.arange(n), cols])  # ... and tight on the optimum
    for _ in range(3):  # the next, slightly different problems start from these prices
        a = a + 0.05 * torch.randn(n, n, generator=gen, dtype=torch.float64)
        cols, duals = max_assignment(a, duals)
        assert torch.equal(cols, dense(a)) and duals is not None


def test_row_and_column_offsets_leave_the_optimum_and_the_proof_exact():
    """The dense path removes row and column means before solving: the answer is still the given matrix's."""
    gen = torch.Generator().manual_seed(2)
    n = 160
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    shifted = a + 40 + 5 * torch.randn(n, 1, generator=gen, dtype=torch.float64) + 5 * torch.randn(1, n, generator=gen, dtype=torch.float64)
    cols, duals = max_assignment(shifted)
    assert torch.equal(cols, dense(a)) and duals is not None
    assert (shifted - duals.row[:, None] - duals.col[None, :]).max() <= 1e-9
    assert torch.allclose(duals.row + duals.col[cols], shifted[torch.arange(n), cols])


def test_useless_prices_still_give_the_optimum():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 200, generator=gen, dtype=torch.float64)
    wrong = Duals(torch.zeros(200, dtype=torch.float64), -100 * torch.arange(200, dtype=torch.float64))
    cols, _ = max_assignment(a, wrong)
    assert torch.equal(cols, dense(a))


def test_a_suboptimal_assignment_gets_no_proof():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(150, 150, generator=gen, dtype=torch.float64)
    best = dense(a)
    worse = best.clone()
    worse[[0, 1]] = worse[[1, 0]]
    assert prove_optimal(a, best) is not None
    assert prove_optimal(a, worse, rounds=150) is None
