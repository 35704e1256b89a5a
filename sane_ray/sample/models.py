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
- :func:`evaluate_split`, :func:`finetune`: accuracy (and which samples are wrong), in
  batches, and a seeded Adam fine-tuning (all layers or the head) that records test accuracy
  after every epoch.
- :func:`with_new_head`, :func:`fit_head`: a task with other classes than the zoo's gets a
  re-initialized head (seeded), which scoring fits in closed form before ranking.
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
from sane_ray.sample.config import FINETUNE_LAYERS
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


EVAL_BATCH = 512  # images per forward pass when scoring: memory bounded by the batch, not the split


@torch.no_grad()
def evaluate_split(model: nn.Module, data: Split, batch_size: int = EVAL_BATCH) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, bool mask of misclassified samples) in eval mode, in batches."""
    was_training = model.training
    model.eval()
    wrong, loss = [], 0.0
    try:
        for start in range(0, len(data), batch_size):
            x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            wrong.append(logits.argmax(1) != y)
    finally:
        model.train(was_training)
    mask = torch.cat(wrong) if wrong else torch.zeros(0, dtype=torch.bool)
    n = max(len(data), 1)
    return 1.0 - float(mask.sum()) / n, loss / n, mask


def classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: the network's last ``nn.Linear`` (its name and module)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no linear classification head")
    return found[-1]


def with_new_head(sd: Mapping[str, torch.Tensor], architecture: str, arch_kwargs: Mapping[str, Any],
                  seed: int) -> nn.Module:
    """The target network (``arch_kwargs`` with the task's ``num_classes``): every tensor from ``sd``
    except the classification head, which keeps its default initialization from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(architecture, **arch_kwargs)
    head, _ = classifier(net)
    state = net.state_dict()
    for key in state:
        if not key.startswith(f"{head}."):
            state[key] = sd[key]
    net.load_state_dict(state)
    return net


@torch.no_grad()
def fit_head(model: nn.Module, data: Split, num_classes: int, ridge: float = 1e-2,
             batch_size: int = EVAL_BATCH) -> None:
    """Fit the classification head in closed form (ridge regression of one-hot labels on the head's
    inputs over ``data``, accumulated batch by batch), the rest of the network fixed: what a new
    head can do before any gradient step."""
    _, head = classifier(model)
    width = head.in_features + 1  # the head's inputs and a bias column
    gram = torch.zeros(width, width, dtype=torch.float64)
    xty = torch.zeros(width, num_classes, dtype=torch.float64)

    def accumulate(_m: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0].detach().double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram.add_(x.T @ x)
        xty.add_(x.T @ nn.functional.one_hot(labels, num_classes).double())

    hook = head.register_forward_hook(accumulate)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            labels = data.y[start:start + batch_size]
            model(data.x[start:start + batch_size])
    finally:
        hook.remove()
        model.train(was_training)
    w = torch.linalg.solve(gram + ridge * len(data) * torch.eye(width, dtype=gram.dtype), xty)
    head.weight.copy_(w[:-1].T.to(head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_(w[-1].to(head.bias.dtype))


def finetune(model: nn.Module, train: Split, test: Split, epochs: int, lr: float, batch_size: int,
             seed: int, on_epoch: Any = None, layers: str = "all") -> list[float]:
    """Adam fine-tuning for ``epochs`` (seeded batch order); test accuracy before and after each epoch.

    ``layers``: ``all`` trains every parameter, ``head`` only the classification head (the rest
    fixed, BatchNorm statistics included). ``on_epoch(epoch, model)`` runs after each epoch (e.g.
    to write a checkpoint).
    """
    if layers not in FINETUNE_LAYERS:
        raise ValueError(f"fine-tuning layers must be one of {', '.join(FINETUNE_LAYERS)}, got {layers!r}")
    params = list(model.parameters()) if layers == "all" else list(classifier(model)[1].parameters())
    opt = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    accs = [evaluate_split(model, test)[0]]
    for epoch in range(1, epochs + 1):
        model.train(layers == "all")  # head only: BatchNorm keeps its statistics (eval mode)
        for idx in torch.randperm(len(train), generator=order).split(batch_size):
            loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        accs.append(evaluate_split(model, test)[0])
        if on_epoch is not None:
            on_epoch(epoch, model)
    return accs
