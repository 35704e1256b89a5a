"""The few collectives the train loop needs, each a no-op without a process group.

Contrastive negatives from all workers: :func:`gather_rows` is an autograd-aware
all-gather (``torch.distributed._functional_collectives.all_gather_single``, the
replacement torch 2.13 names for the deprecated ``torch.distributed.nn.functional.
all_gather``). Its backward is a reduce-scatter with SUM: every rank's local rows
receive the sum of the gradients all ranks' losses send them. FSDP then *averages* parameter
gradients over ranks, so the parameter gradient is that of ``mean_r L_r``, which
(for equal local batches) is exactly the loss of the global batch. The unit test
``tests/test_train_fsdp.py`` checks this against a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated in rank order, and the row offset of this rank's block.

    Every rank must pass the same shape. Gradients flow back to every rank's rows.
    """
    if not is_distributed():
        return local, 0
    gathered = funcol.all_gather_single(local.contiguous(), 0, dist.group.WORLD)
    return funcol.wait_tensor(gathered), dist.get_rank() * local.shape[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` is unchanged)."""
    out = t.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``t`` over ranks (a new tensor)."""
    out = t.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
