"""From decoded tokens to working networks, and the little training sampling needs.

- :func:`check_positions`: the run's position tables must cover the target's tokens (else
  one error naming ``train.model.max_positions``).
- :func:`decode_states`: latents -> haloed decoding -> de-standardized tokens -> state dicts
  of the target architecture. Tensors tokenization kept aside (BatchNorm, see
  :data:`~sane_ray.weights.tokenize.BN_MODES`) come from the architecture's default
  initialization, seeded per candidate; BN-conditioning then sets the running statistics.
- :func:`bn_condition`: forward passes on target data in train mode without gradients; the
  running statistics are reset and re-estimated as an exact average over the batches, and
  nothing else changes (parameters, other buffers).
- :func:`evaluate_split`, :func:`finetune`: accuracy (and which samples are wrong), and a
  seeded Adam fine-tuning that records test accuracy after every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sane_ray.embed.encode import decode_haloed, halo_plan
from sane_ray.model.layers import check_tables
from sane_ray.model.sane import SaneModel
from sane_ray.weights.standardize import StandardizationStats
from sane_ray.weights.tokenize import TokenLayout, detokenize_stack, layout_positions
from sane_ray.zoo.architectures import build_model
from sane_ray.zoo.tasks import Split


def check_positions(model: SaneModel, layout: TokenLayout, architecture: str) -> None:
    """Refuse a target whose token positions exceed the run's position tables, naming the setting."""
    check_tables([int(v) + 1 for v in layout_positions(layout).max(dim=0).values], model.cfg.max_positions,
                 "train.model.max_positions", f"target {architecture} ({layout.num_tokens} tokens)",
                 "pretrain with a larger train.model.max_positions (headroom) to sample this architecture")


def default_state(architecture: str, arch_kwargs: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The architecture's default initialization (PyTorch's layer init) from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(architecture, **arch_kwargs).state_dict()


@torch.no_grad()
def decode_states(
    model: SaneModel,
    latents: torch.Tensor,
    layout: TokenLayout,
    stats: StandardizationStats,
    pad_position: Sequence[int],
    window_size: int,
    halo: int | None,
    architecture: str,
    arch_kwargs: Mapping[str, Any],
    init_seeds: Sequence[int],
) -> list[dict[str, torch.Tensor]]:
    """State dicts of the target for latents (K, N, d_z); ``halo=0``: plain windows (naive decoding)."""
    plan = halo_plan(layout.num_tokens, window_size, halo)
    pos = layout_positions(layout)
    tokens = stats.invert_tokens(decode_haloed(model, latents, pos, plan, pad_position).cpu(), layout)
    stacked = detokenize_stack(tokens, layout)
    out = []
    for i, seed in enumerate(init_seeds):
        init = default_state(architecture, arch_kwargs, seed)
        sd = {k: (stacked[k][i].clone() if k in stacked else init[k]) for k in layout.keys}
        out.append(sd)
    return out


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def bn_condition(model: nn.Module, data: Split, batches: int, batch_size: int, generator: torch.Generator,
                 momentum: float = 0.0) -> int:
    """Re-estimate every BatchNorm's running statistics from ``batches`` random batches of ``data``;
    returns the number of BN layers conditioned (0: the model has none, nothing runs).

    ``momentum`` 0 (the default): statistics reset, then the exact average over the batches, so
    nothing of the decoded statistics survives. > 0: the reference's procedure, forward passes
    that update the decoded statistics as running averages with this momentum."""
    layers = _bn_layers(model)
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for m in layers:
        if momentum > 0:
            m.momentum = momentum
        else:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the conditioning batches
    model.train()
    try:
        for _ in range(batches):
            idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)
            model(data.x[idx])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(layers)


@torch.no_grad()
def evaluate_split(model: nn.Module, data: Split) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, bool mask of misclassified samples) in eval mode."""
    was_training = model.training
    model.eval()
    try:
        logits = model(data.x)
    finally:
        model.train(was_training)
    wrong = logits.argmax(1) != data.y
    return 1.0 - float(wrong.float().mean()), float(nn.functional.cross_entropy(logits, data.y)), wrong


def finetune(model: nn.Module, train: Split, test: Split, epochs: int, lr: float, batch_size: int,
             seed: int, on_epoch: Any = None) -> list[float]:
    """Adam fine-tuning for ``epochs`` (seeded batch order); test accuracy before and after each epoch.

    ``on_epoch(epoch, model)`` runs after each epoch (e.g. to write a checkpoint).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    accs = [evaluate_split(model, test)[0]]
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(train), generator=order).split(batch_size):
            loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        accs.append(evaluate_split(model, test)[0])
        if on_epoch is not None:
            on_epoch(epoch, model)
    return accs
