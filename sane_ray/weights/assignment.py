"""Maximum-weight assignment, warm-started from the duals of the previous, similar problem.

Weight matching solves the assignment of one group many times, each time on a matrix
only a little different from the last. scipy's dense solver starts from nothing every
time (17-26 ms for 512 units here, with row and column means removed). The dual prices ``u, v`` of the previous optimum
(``u_i + v_j >= A_ij``, equal on the assignment) nearly price the new matrix too, so
the new optimum uses, row by row and column by column, only entries with the highest
reduced weight ``A_ij - u_i - v_j``. We solve the sparse problem on the ``k`` best of
each row and column (scipy's LAPJVsp), then *prove* the candidate optimal for the full
matrix: an assignment is optimal iff no cyclic exchange of columns gains, i.e. iff
Bellman-Ford finds potentials on the exchange graph (row ``i`` taking the column of row
``k`` gains ``A[i, c_k] - A[k, c_k]``). The potentials are the new duals. Without a
proof (or a feasible sparse problem) the dense solver decides. A proved optimum is *the*
optimum whenever it is unique, so results equal the dense solver's except at exact ties.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

# Below this many units the dense solver takes well under a millisecond.
WARM_MIN_UNITS = 128
# Entries kept per row and per column for the sparse candidate.
CANDIDATES = 32
# Bellman-Ford rounds before giving up on a proof (proofs here take 5-50).
PROOF_ROUNDS = 64


@dataclass(frozen=True)
class Duals:
    """Prices of rows and columns with ``row[i] + col[j] >= A[i, j]`` (float64)."""

    row: torch.Tensor
    col: torch.Tensor


def prove_optimal(a: torch.Tensor, cols: torch.Tensor, start: torch.Tensor | None = None,
                  rounds: int = PROOF_ROUNDS) -> Duals | None:
    """Duals proving assignment ``i -> cols[i]`` maximal for ``a``, or None if none were found.

    Longest-path Bellman-Ford on the exchange graph from potentials ``start`` (e.g. minus
    the previous row prices); a fixed point within ``rounds`` means no gainful cycle. A
    round relaxes only the rows whose potential rose in the last one (the others cannot
    raise anything again): the same iterates as relaxing every row, at a fraction of the
    work once few potentials still move.
    """
    b = a[:, cols]
    diag = b.diagonal()
    w = b - diag[None, :]  # w[i, k]: row i takes row k's column
    p = torch.zeros_like(diag) if start is None else start.clone()
    moved_w, moved_p = w, p  # first round: every row
    for _ in range(rounds):
        best = (moved_p[:, None] + moved_w).amax(0)
        rose = best > p
        if not rose.any():
            col = torch.empty_like(p)
            col[cols] = diag + p
            return Duals(-p, col)
        p = torch.where(rose, best, p)
        moved = rose.nonzero().squeeze(1)
        moved_w, moved_p = w.index_select(0, moved), p.index_select(0, moved)
    return None


def _sparse_candidate(a: torch.Tensor, prior: Duals, k: int) -> torch.Tensor | None:
    """Best assignment among each row's and column's ``k`` highest reduced weights (None: none is full)."""
    n = a.shape[0]
    reduced = (a - prior.row[:, None] - prior.col[None, :]).numpy()
    keep = np.zeros((n, n), dtype=bool)
    units = np.arange(n)[:, None]
    # argpartition: 2x faster than torch.topk here; the order within the k does not matter
    keep[units, np.argpartition(reduced, -k, axis=1)[:, -k:]] = True
    keep[np.argpartition(reduced.T, -k, axis=1)[:, -k:], units] = True
    rows, cols = keep.nonzero()
    # shifted to >= 1: the sparse solver must not see a kept entry as a missing (zero) one
    vals = reduced[rows, cols] - reduced.min() + 1.0
    graph = csr_matrix((vals, (rows, cols)), shape=(n, n))
    try:
        r, c = min_weight_full_bipartite_matching(graph, maximize=True)
    except ValueError:  # the kept entries admit no full assignment
        return None
    out = np.empty(n, dtype=np.int64)
    out[r] = c
    return torch.from_numpy(out)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The proof runs dozens of sub-millisecond O(n^2) ops: on a busy machine each thread
    barrier costs more than a second thread saves (10x slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def max_assignment(a: torch.Tensor, prior: Duals | None = None) -> tuple[torch.Tensor, Duals | None]:
    """Columns of a maximum-weight assignment of square float64 ``a`` (row ``i`` -> ``cols[i]``),
    and duals for warm-starting the next, similar problem (None where no proof was found)."""
    with _one_thread():
        return _max_assignment(a, prior)


def _max_assignment(a: torch.Tensor, prior: Duals | None) -> tuple[torch.Tensor, Duals | None]:
    n = a.shape[0]
    if prior is not None and n >= WARM_MIN_UNITS:
        cand = _sparse_candidate(a, prior, min(CANDIDATES, n))
        if cand is not None:
            duals = prove_optimal(a, cand, -prior.row)
            if duals is not None:
                return cand, duals
    # A constant added to a row or a column changes every assignment's total alike. These
    # matrices sit far from zero (mean 5-10 standard deviations above it), and scipy's
    # solver runs 2.5-3.5x faster with the row and column means removed (512 units:
    # 58-70 ms -> 17-26 ms), to the same optimum.
    centered = a - a.mean(1, keepdim=True) - a.mean(0, keepdim=True)
    cols = torch.from_numpy(linear_sum_assignment(centered.numpy(), maximize=True)[1]).to(torch.int64)
    return cols, (prove_optimal(a, cols) if n >= WARM_MIN_UNITS else None)
