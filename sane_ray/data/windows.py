"""Random windows of consecutive tokens, drawn for many models at once (pure torch).

A *block* holds the token sequences of R checkpoints concatenated along the token axis
(``offsets``/``lengths`` say where each one is). :func:`plan_windows` draws every window
of the block (its source row and start token) and :func:`gather_windows` cuts them all
out with one fancy-index per view: no Python loop over windows or tokens.

Order (the paper keeps one window per model per batch): windows are emitted in *rounds*,
one window per row per round, rows in the same order in every round. Rows are ordered
so that checkpoints of the same model are as far apart as the block allows (all first
checkpoints of the models, then all second ones, ...). Hence any run of consecutive
windows no longer than the block's row count comes from distinct checkpoints, and from
distinct models when the block has at least that many models. Rows whose model is
shorter than others get fewer windows in late rounds (``counts``).

Models shorter than the window (zoos mixing architectures) get one window at start 0,
padded to ``window_size``: padded tokens are zero with ``mask`` False and position
``pad_position``, a reserved ``(n, l, k)`` one past the largest real position of the zoo,
so position tables get one dedicated padding row and no real position is aliased. A
token is padding exactly when its mask row is all False (real tokens always hold at
least one weight), so consumers can derive an attention key mask as ``mask.any(-1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class WindowSizeError(ValueError):
    """The window is longer than every model's token sequence."""


def check_window_size(window_size: int, sequence_lengths: dict[str, int]) -> None:
    """Raise :class:`WindowSizeError` naming the setting unless some model is at least ``window_size`` long."""
    if window_size < 1:
        raise WindowSizeError(f"window_size must be >= 1, got {window_size}")
    if not sequence_lengths:
        raise WindowSizeError("no token sequences to draw windows from")
    longest = max(sequence_lengths, key=sequence_lengths.__getitem__)
    if window_size > sequence_lengths[longest]:
        raise WindowSizeError(
            f"window_size={window_size} is longer than every model's token sequence "
            f"(longest: {longest} with {sequence_lengths[longest]} tokens); set window_size <= "
            f"{sequence_lengths[longest]} or use a smaller token_size"
        )


def windows_per_checkpoint(sequence_length: int, window_size: int, override: int | None = None) -> int:
    """Windows per checkpoint per pass: ``override``, else about one full coverage of the sequence.

    A model no longer than the window has exactly one window (the whole model, padded).
    """
    if sequence_length <= window_size:
        return 1
    if override is not None:
        return override
    return max(1, round(sequence_length / window_size))


def balanced_counts(base: Sequence[int], rows: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Windows per checkpoint per layout so that layout l draws about ``weights[l] / sum(weights)`` of a
    pass's windows, the pass as long as with the ``base`` counts (:func:`windows_per_checkpoint`).

    ``rows`` are the training checkpoints per layout (layouts without any keep their base count).
    Without balancing, a layout's share grows with its sequence length, so the largest
    architecture of a mixed zoo takes most of every pass. A short model repeated in a pass
    is the whole model again: its loss weight, not new data.
    """
    active = [i for i, r in enumerate(rows) if r > 0]
    if len(active) < 2:
        return list(base)
    total = sum(rows[i] * base[i] for i in active)
    weight = sum(weights[i] for i in active)
    out = list(base)
    for i in active:
        out[i] = max(1, round(total * weights[i] / weight / rows[i]))
    return out


def interleave_rows(model_codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Row order that spreads checkpoints of the same model: first checkpoint of every model
    (models in random order), then every second checkpoint, and so on."""
    r = model_codes.numel()
    if r == 0:
        return torch.empty(0, dtype=torch.int64)
    codes = torch.unique(model_codes, return_inverse=True)[1]
    n_models = int(codes.max()) + 1
    by_model = torch.argsort(codes, stable=True)
    counts = torch.bincount(codes, minlength=n_models)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(r, dtype=torch.int64)  # rank of each row within its model (row order kept)
    rank[by_model] = torch.arange(r) - starts[codes[by_model]]
    model_rank = torch.randperm(n_models, generator=generator)
    return torch.argsort(rank * n_models + model_rank[codes])


@dataclass(frozen=True)
class WindowPlan:
    """Windows to cut: source row (into the block) and start token of each, in emission order."""

    rows: torch.Tensor  # int64 (W,)
    starts: torch.Tensor  # int64 (W,)


def plan_windows(
    lengths: torch.Tensor,
    counts: torch.Tensor,
    window_size: int,
    order: torch.Tensor,
    generator: torch.Generator | None = None,
) -> WindowPlan:
    """Round-robin plan: round ``r`` has one window for every row (in ``order``) with ``counts > r``.

    Starts are uniform over ``0 .. length - window_size`` (0 for rows shorter than the window).
    """
    lengths = lengths.to(torch.int64)
    counts = counts.to(torch.int64)
    if order.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return WindowPlan(empty, empty)
    rounds = int(counts.max())
    grid = order.expand(rounds, -1)  # (rounds, R): row of each slot
    keep = torch.arange(rounds)[:, None] < counts[grid]
    rows = grid[keep]
    span = (lengths[rows] - window_size).clamp(min=0) + 1
    starts = (torch.rand(rows.numel(), generator=generator, dtype=torch.float64) * span).to(torch.int64)
    return WindowPlan(rows, torch.minimum(starts, span - 1))


def window_index(plan: WindowPlan, lengths: torch.Tensor, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index within each window's model (W, ws), clamped in range, and validity (False on
    padding past the end of a model shorter than the window)."""
    local = plan.starts[:, None] + torch.arange(window_size)
    length = lengths[plan.rows][:, None]
    return torch.minimum(local, length - 1), local < length


def gather_windows(
    views: Sequence[torch.Tensor],
    token_index: torch.Tensor,
    mask_table: torch.Tensor,
    pos_table: torch.Tensor,
    layout_index: torch.Tensor,
    valid: torch.Tensor,
    pad_position: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Cut the windows out of every view and out of the layouts' mask and position tables.

    ``views`` are (T, d_t) token tensors indexed by ``token_index`` (W, ws); ``mask_table``
    (bool, (L, d_t)) and ``pos_table`` ((L, 3)) are indexed by ``layout_index`` (W, ws).
    Returns views as (W, ws, d_t), mask (W, ws, d_t) and positions (W, ws, 3); padded tokens
    are zero, unmasked and at ``pad_position``.
    """
    v3 = valid[..., None]
    out_views = [torch.where(v3, view[token_index], 0.0) for view in views]
    out_mask = mask_table[layout_index] & v3
    out_pos = torch.where(v3, pos_table[layout_index], pad_position.to(torch.int64))
    return out_views, out_mask, out_pos
