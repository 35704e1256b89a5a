"""One training or evaluation step on a batch in the data contract's format.

A batch holds two clean views ``x_i``/``x_j`` (B, ws, d_t), their shared ``mask`` and
``pos``, and the source ``model_idx`` of each window. Both views go through the model in
one call (2B windows), noise is applied on the device, and each view is reconstructed
towards its clean tokens or, with ``reconstruction_target="noisy"``, its noisy input
(the reference's target). Windows of the same model are never each other's contrastive
negatives.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from sane_ray.model.config import SaneConfig
from sane_ray.model.losses import GatherFn, LossParts, masked_mse, sane_loss
from sane_ray.train.runtime import Runtime
from sane_ray.weights.augment import multiplicative_noise

BATCH_KEYS = ("x_i", "x_j", "mask", "pos")
MODEL_KEY = "model_idx"  # optional: without it no two windows of a batch share a model


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The contract's tensors on ``device`` (``model_idx`` when present); a missing key is named in the error."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}; expected keys {list(BATCH_KEYS)} (docs/CONTRACTS.md)")
    keys = BATCH_KEYS + ((MODEL_KEY,) if MODEL_KEY in batch else ())
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


def compute_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    cfg: SaneConfig,
    runtime: Runtime,
    gather: GatherFn | None = None,
    noise: torch.Generator | None = None,
    autocast: bool = False,
) -> LossParts:
    """Forward both views (noised with ``noise`` unless None) and the SANE loss.

    ``autocast`` runs the forward under ``torch.autocast`` in the runtime's compute
    dtype; with FSDP the mixed-precision policy does that instead.
    """
    clean = torch.cat([batch["x_i"], batch["x_j"]])
    x = clean if noise is None else multiplicative_noise(clean, cfg.noise_sigma, noise)
    mask = torch.cat([batch["mask"], batch["mask"]])
    pos = torch.cat([batch["pos"], batch["pos"]])
    ctx = torch.autocast(runtime.device_type, dtype=runtime.param_dtype) if autocast and runtime.mixed else nullcontext()
    with ctx:
        out = model(x, pos, mask.any(dim=-1))
    p_i, p_j = out.projection.float().chunk(2)
    target = x if cfg.reconstruction_target == "noisy" else clean
    return sane_loss(out.x_hat, target, mask, p_i, p_j, cfg.gamma, cfg.temperature, gather,
                     over=cfg.reconstruction_norm, model_ids=batch.get(MODEL_KEY))


def zero_prediction_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reconstruction loss of predicting 0 for every token of both views.

    Tokens are standardized, so 0 is every weight's mean: this is the trivial baseline
    that a model's reconstruction loss on the same batch must beat.
    """
    clean = torch.cat([batch["x_i"], batch["x_j"]])
    return masked_mse(torch.zeros_like(clean), clean, torch.cat([batch["mask"], batch["mask"]]))


def optimizer_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
) -> torch.Tensor:
    """Backward, clip to ``grad_clip`` (0: no clipping), step optimizer and schedule.

    If the data yields more steps than the schedule planned, the learning rate stays at
    its final value.

    Returns the global gradient norm before clipping (a 0-d tensor; no host sync).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    optimizer.step()
    if scheduler.last_epoch < getattr(scheduler, "total_steps", float("inf")):
        scheduler.step()  # past the planned steps OneCycle would raise; hold its final rate instead
    return norm.detach()
