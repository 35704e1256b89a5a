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


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 / AMX), which oneDNN uses."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def select_runtime(use_gpu: bool, mixed_precision: bool = True, cpu_bf16: bool | None = None) -> Runtime:
    """CUDA -> NCCL with bf16 compute and fp32 reduction; CPU -> gloo, with bf16 compute only
    where the CPU has native bf16 (``cpu_bf16``, default :func:`cpu_has_bf16`), else fp32.

    On the AVX512-BF16 CPU we benchmark, bf16 runs the reference preset's step 1.8-1.9x
    faster than fp32 and its loss curve stays within fp32's run-to-run noise
    (bench/README.md); without native bf16 it is emulated and slower. Reduction stays fp32.
    """
    half = torch.bfloat16 if mixed_precision else torch.float32
    if use_gpu:
        return Runtime("cuda", "nccl", half, torch.float32)
    native = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
    return Runtime("cpu", "gloo", half if native else torch.float32, torch.float32)
