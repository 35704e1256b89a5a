"""AdamW plus a OneCycle learning-rate schedule stepped once per optimizer step."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import OneCycleLR

from sane_ray.model.sane import configure_optimizer
from sane_ray.train.config import OptimConfig


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, OneCycleLR]:
    """AdamW (decay on 2-d+ parameters only) and OneCycle over ``total_steps`` steps.

    The schedule warms up from ``lr / div_factor`` to ``lr`` over ``pct_start`` of the
    steps, then anneals (cosine) to ``lr / (div_factor * final_div_factor)``.
    """
    if total_steps <= 0:
        raise ValueError(f"the OneCycle schedule needs a positive number of steps, got {total_steps}")
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    scheduler = OneCycleLR(
        optimizer,
        max_lr=cfg.lr,
        total_steps=total_steps,
        pct_start=cfg.pct_start,
        anneal_strategy="cos",
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        cycle_momentum=cfg.cycle_momentum,
    )
    return optimizer, scheduler
