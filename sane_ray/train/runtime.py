"""Device, process-group backend and precision for a worker, decided in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision a worker computes.

    ``param_dtype`` is the compute dtype of parameters (FSDP casts shards to it on
    all-gather, or autocast uses it without FSDP); ``reduce_dtype`` is the dtype of
    the gradient reduction. The master weights and optimizer state stay fp32.
    """

    device_type: str  # "cuda" or "cpu"
    backend: str  # torch.distributed backend: "nccl" or "gloo"
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.param_dtype != torch.float32


def select_runtime(use_gpu: bool, mixed_precision: bool = True) -> Runtime:
    """CUDA -> NCCL with bf16 compute and fp32 reduction; CPU -> gloo, fp32 throughout.

    CPU training stays fp32: bf16 matmuls are not faster on typical CPUs and gloo
    reduces fp32 anyway.
    """
    if use_gpu:
        half = torch.bfloat16 if mixed_precision else torch.float32
        return Runtime("cuda", "nccl", half, torch.float32)
    return Runtime("cpu", "gloo", torch.float32, torch.float32)
