"""SANE's training loss: masked reconstruction plus NT-Xent contrastive guidance.

``L = gamma * NTXent(p_i, p_j) + (1 - gamma) * masked MSE``. The MSE is averaged over
the real entries (``"real"``, the default) or over all entries, padding included
(``"all"``, the reference implementation's ``MSELoss(mask * x_hat, target)``): the two
differ by the fraction of real entries, which shifts the weight of ``gamma``
(docs/design.md). ``"token"`` averages each token's squared error over its own real
entries, then over the tokens that have any: a token of a small layer (a 10-row head cut
into 289-wide tokens is mostly padding) then weighs as much as a full one, so in a zoo
mixing architectures the few entries of small models are not drowned by the many of large
ones (the per-token normalization of multi-zoo SANE training). The contrastive term can
use negatives from other workers: :func:`nt_xent` takes the local projections as
anchors and, optionally, the projections gathered from all workers as keys. Gathering
itself lives in ``sane_ray.train`` (this package knows nothing about processes); it is
passed in as a function. Other windows or checkpoints of the anchor's own model are no
negatives (they are not "other" samples): given model ids, :func:`nt_xent` masks them out.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from sane_ray.model.config import RECONSTRUCTION_NORMS

# gather(local (B, D)) -> (all workers' rows (N, D), row offset of the local block in them)
GatherFn = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class LossParts(NamedTuple):
    total: torch.Tensor
    reconstruction: torch.Tensor  # under the configured normalization
    contrastive: torch.Tensor
    by_norm: dict[str, torch.Tensor]  # the reconstruction under every normalization (for reporting)


def masked_mse(x_hat: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, over: str = "real") -> torch.Tensor:
    """Squared error on the real (mask=True) entries; padding never contributes.

    ``over="real"`` divides by the number of real entries, ``over="all"`` by the number
    of all entries (padding included), ``over="token"`` averages per token (module doc).
    """
    _check_norm(over)
    return masked_errors(x_hat, target, mask)[over]


def _check_norm(over: str) -> None:
    if over not in RECONSTRUCTION_NORMS:
        raise ValueError(f"unknown reconstruction normalization {over!r}; known: {', '.join(RECONSTRUCTION_NORMS)}")


def masked_errors(x_hat: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The masked MSE under every normalization of :data:`RECONSTRUCTION_NORMS`, from one squared error."""
    if x_hat.shape != target.shape or mask.shape != target.shape:
        raise ValueError(
            f"masked_mse needs equal shapes, got x_hat {tuple(x_hat.shape)}, target {tuple(target.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    m = mask.to(x_hat.dtype)
    sq = (x_hat - target) ** 2 * m
    per_token_n = m.sum(-1)
    per_token = sq.sum(-1) / per_token_n.clamp_min(1.0)
    real_tokens = (per_token_n > 0).to(x_hat.dtype)
    total = sq.sum()
    return {
        "real": total / m.sum().clamp_min(1.0),
        "all": total / float(m.numel()),
        "token": (per_token * real_tokens).sum() / real_tokens.sum().clamp_min(1.0),
    }


def nt_xent(
    p_i: torch.Tensor,
    p_j: torch.Tensor,
    temperature: float,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
    model_ids: torch.Tensor | None = None,
    key_model_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalized-temperature cross entropy (SimCLR) with the local windows as anchors.

    ``p_i[b]`` and ``p_j[b]`` are two views of window b. Each of the 2B anchors must pick
    its other view among all 2N keys except itself. ``keys = (all_i, all_j)`` are the
    projections of every worker (N rows each) with the local block at rows
    ``offset:offset+B``; without keys the local batch is all there is (N = B).
    ``model_ids`` (B,) and ``key_model_ids`` (N,; default ``model_ids``) name each window's
    model: keys of the anchor's model other than its own positive get no weight.
    Returns the mean over the local anchors, so the mean over equally sized workers
    equals the loss of the global batch.
    """
    b = p_i.shape[0]
    all_i, all_j = keys if keys is not None else (p_i, p_j)
    n = all_i.shape[0]
    if key_model_ids is None:
        key_model_ids = model_ids
    ids_fit = model_ids is None or (model_ids.shape == (b,) and key_model_ids is not None and key_model_ids.shape == (n,))
    if p_j.shape != p_i.shape or all_j.shape != all_i.shape or not 0 <= offset <= n - b or not ids_fit:
        raise ValueError(
            f"nt_xent: views {tuple(p_i.shape)}/{tuple(p_j.shape)}, keys {tuple(all_i.shape)}/{tuple(all_j.shape)}, "
            f"offset {offset} and model ids {None if model_ids is None else tuple(model_ids.shape)}/"
            f"{None if key_model_ids is None else tuple(key_model_ids.shape)} do not fit together"
        )
    anchors = F.normalize(torch.cat([p_i, p_j]).float(), dim=-1)
    table = F.normalize(torch.cat([all_i, all_j]).float(), dim=-1)
    logits = anchors @ table.T / temperature  # (2B, 2N)
    local = torch.arange(b, device=p_i.device) + offset
    self_idx = torch.cat([local, local + n])
    positive = torch.cat([local + n, local])
    rows = torch.arange(2 * b, device=p_i.device)
    logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), device=logits.device))
    if model_ids is not None:  # same model, another window: no negative (its own views stay self/positive)
        same = model_ids[:, None] == key_model_ids[None, :]  # (B, N)
        same[torch.arange(b, device=same.device), local] = False
        logits = logits.masked_fill(same.repeat(2, 2), float("-inf"))
    return F.cross_entropy(logits, positive)


def sane_loss(
    x_hat: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    p_i: torch.Tensor,
    p_j: torch.Tensor,
    gamma: float,
    temperature: float,
    gather: GatherFn | None = None,
    over: str = "real",
    model_ids: torch.Tensor | None = None,
) -> LossParts:
    """``gamma * NTXent + (1 - gamma) * masked MSE``, with both parts for logging.

    ``x_hat``/``target``/``mask`` cover both views stacked; ``over`` is the MSE's
    normalization (:func:`masked_mse`). With ``gather`` the contrastive negatives come
    from all workers. ``model_ids`` (B,) keep windows of one model from being each
    other's negatives.
    """
    _check_norm(over)
    by_norm = masked_errors(x_hat.float(), target.float(), mask)
    rec = by_norm[over]
    if gather is None:
        con = nt_xent(p_i, p_j, temperature, model_ids=model_ids)
    else:
        d = p_i.shape[1]
        local = torch.cat([p_i.float(), p_j.float()], dim=1)
        if model_ids is not None:  # ids ride along as one float32 column (exact below 2**24 models)
            local = torch.cat([local, model_ids.to(local)[:, None]], dim=1)
        both, offset = gather(local)  # one collective for both views and the ids
        all_i, all_j = both[:, :d], both[:, d : 2 * d]
        key_ids = both[:, 2 * d].long() if model_ids is not None else None
        con = nt_xent(p_i, p_j, temperature, keys=(all_i, all_j), offset=offset,
                      model_ids=model_ids, key_model_ids=key_ids)
    return LossParts(gamma * con + (1.0 - gamma) * rec, rec, con, by_norm)
