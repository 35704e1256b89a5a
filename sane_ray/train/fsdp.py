"""FSDP2 for the SANE model: one shard group per transformer block, then the root.

Sharding per block lets each block's parameters be all-gathered just before it runs
and freed right after, so peak memory holds about one block in full precision; the
root group takes the rest (embeddings, in/out projections, projection head).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from sane_ray.model.sane import SaneModel


def data_parallel_mesh(device_type: str, world_size: int) -> DeviceMesh:
    """A 1-d mesh over all ranks of the (already initialized) default process group."""
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def apply_fsdp(
    model: SaneModel,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
) -> FSDPModule:
    """Shard ``model`` in place with ``fully_shard``; returns it (now also an FSDPModule).

    Every rank must hold identical initial weights (same seed): each keeps its shard
    of its local copy. Build the optimizer afterwards, over the sharded parameters.
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.transformer_blocks():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)
