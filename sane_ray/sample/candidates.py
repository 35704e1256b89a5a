"""Candidates: drawn from the per-token distribution, decoded, BN-conditioned, scored, written, ranked.

:func:`make_candidates` runs in a Ray task (one chunk of a round's candidates, each from
its own seed); the driver ranks every candidate so far with :func:`rank`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sane_ray.sample.context import (
    BN,
    DRAW,
    HEAD,
    INIT,
    TASK_SPLITS,
    Context,
    cached_run,
    cached_task,
    condition,
    derive,
    fit_new_head,
    metrics,
    target_net,
)
from sane_ray.sample.kde import TokenKDE
from sane_ray.sample.models import decode_states
from sane_ray.zoo.native import write_checkpoint


def candidate_id(round_: int, index: int) -> str:
    return f"r{round_}-c{index:04d}"


def make_candidates(ctx: Context, kde: TokenKDE, round_: int, indices: list[int]) -> list[dict[str, Any]]:
    """Draw, decode, BN-condition (and with a new head fit it), score and write candidates ``indices`` of
    round ``round_``; their manifest rows."""
    torch.set_num_threads(ctx.threads)
    run, task = cached_run(ctx.run_uri), cached_task(ctx.task_ref)
    draw_seeds = [derive(ctx.seed, DRAW, round_, i) for i in indices]
    latents = kde.sample(draw_seeds, threads=1)
    states = decode_states(run.model, latents.to(run.device), ctx.layout, ctx.stats, run.preprocessing.pad_position,
                           ctx.window_size, ctx.halo, ctx.architecture, ctx.arch_kwargs,
                           [derive(ctx.seed, INIT, round_, i) for i in indices])
    rows = []
    for i, draw_seed, sd in zip(indices, draw_seeds, states):
        net = target_net(ctx, sd, derive(ctx.seed, HEAD, round_, i))
        condition(ctx, net, task, derive(ctx.seed, BN, round_, i))
        fit_new_head(ctx, net, task, derive(ctx.seed, HEAD, round_, i, 1))
        hparams = {"round": round_, "index": i, "draw_seed": draw_seed, "mode": ctx.mode, "task": ctx.task,
                   "new_head": ctx.new_head}
        rows.append(write_checkpoint(ctx.candidates_uri, candidate_id(round_, i), 0, net.state_dict(),
                                     metrics(net, task), ctx.architecture, ctx.target_kwargs, hparams, ctx.s3))
    return rows


class SamplingFailedError(RuntimeError):
    """Every candidate of a sampling job is broken (non-finite loss or accuracy)."""


SCORED = tuple(f"{split}_{m}" for split in TASK_SPLITS for m in ("acc", "loss"))


def broken(row: dict[str, Any]) -> bool:
    """A candidate with any non-finite accuracy or loss (a diverged decode): never kept."""
    return not all(math.isfinite(float(row[k])) for k in SCORED)


def _score(row: dict[str, Any]) -> tuple:
    """Ranking key: broken candidates last, then validation accuracy, validation loss, draw order
    (NaN compares false with everything, so it must never reach the sort as a number)."""
    order = (row["hparams_round"], row["hparams_index"])
    return (True, 0.0, 0.0, *order) if broken(row) else (False, -row["val_acc"], row["val_loss"], *order)


def rank(rows: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """Sort ``rows`` in place (best first, broken last) and return the best ``keep`` that are not
    broken (empty when every candidate is)."""
    rows.sort(key=_score)
    return [r for r in rows[:keep] if not broken(r)]
