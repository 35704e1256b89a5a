"""Check the GPU training path with torch alone (no Ray): bf16, flash attention, FSDP2 over NCCL.

Builds a SANE preset (default ``resnet``: d_model 2048, 8+8 layers, window 256, d_t 288)
directly on the GPU, shards it with the training job's own FSDP2 wrapping on a one-rank
NCCL process group, and times the training job's own step (both views, NT-Xent over the
gathered projections, AdamW + OneCycle) on random windows. Prints tokens/s, peak memory
and model FLOP utilization against the device's dense bf16 peak. On a machine without
CUDA it prints what it would select and exits 0.

    python bench/gpu_check.py [--preset resnet] [--batch-size 32] [--warmup 3] [--steps 10]

Attention: the ``flash-attn`` package when installed (what the model selects itself), else
PyTorch SDPA restricted to its flash kernel when that kernel takes these shapes, else
SDPA's own choice (said so in the output). Model FLOPs per token: ``6 x`` the matmul
parameters plus ``12 x window x d_model`` per transformer layer for attention scores and
values (forward + backward), the usual accounting; embedding lookups count nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sane_ray.model import attention  # noqa: E402
from sane_ray.model.config import SaneConfig, preset  # noqa: E402
from sane_ray.train.runtime import Runtime, select_runtime  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendor data sheets. The
# first key contained in the device name wins, so the more specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its CUDA name; None when it is not in the table."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def matmul_params(cfg: SaneConfig) -> int:
    """Weights in a matrix product with every token: both stacks' in/out projections and blocks.

    The projection head runs once per window, and position tables are lookups: neither counts.
    """
    d, layers = cfg.d_model, 2 * cfg.n_layers
    return 2 * (cfg.d_t * d + d * cfg.d_z) + layers * 12 * d * d


def flops_per_token(cfg: SaneConfig, window: int) -> float:
    """Model FLOPs per token for one training step (forward + backward), the head spread over its window."""
    head = cfg.d_z * cfg.projection_dim + cfg.projection_dim**2
    return 6.0 * (matmul_params(cfg) + head / window) + 12.0 * 2 * cfg.n_layers * window * cfg.d_model


@dataclass(frozen=True)
class Plan:
    """What the check runs with: device, precision, process-group backend, attention kernel."""

    runtime: Runtime
    device_name: str
    attention: str  # "flash-attn", "sdpa-flash" or "sdpa"
    peak_tflops: float | None

    def describe(self) -> str:
        kernel = {"flash-attn": "the flash-attn package (flash_attn_func)",
                  "sdpa-flash": "PyTorch SDPA, flash kernel only",
                  "sdpa": "PyTorch SDPA, its own kernel choice (flash kernel unavailable here)"}[self.attention]
        peak = f"{self.peak_tflops:g} TFLOP/s dense bf16" if self.peak_tflops else "not in the peak table: no MFU"
        return (f"device      {self.device_name} ({peak})\n"
                f"precision   {self.runtime.param_dtype} compute, {self.runtime.reduce_dtype} reduction and master weights\n"
                f"attention   {kernel}\n"
                f"parallelism FSDP2 (one group per block, then the root), 1 rank, {self.runtime.backend}")


def make_plan(device_name: str | None, sdpa_flash: bool) -> Plan:
    """The selection for a device (``None``: no CUDA), through the training job's own choices.

    ``sdpa_flash``: whether SDPA's flash kernel accepts this model's attention shapes.
    """
    runtime = select_runtime(use_gpu=device_name is not None, mixed_precision=True)
    chosen = attention.select_attention_backend(torch.device(runtime.device_type), runtime.param_dtype)
    if chosen is attention.flash_attention:
        kernel = "flash-attn"
    else:
        kernel = "sdpa-flash" if sdpa_flash else "sdpa"
    return Plan(runtime, device_name or "CPU", kernel, peak_bf16_tflops(device_name) if device_name else None)


def sdpa_flash_usable(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> bool:
    """Whether SDPA's flash kernel runs these shapes on this device (tried once, forward and backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, 16, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q).sum().backward()
        return True
    except RuntimeError:
        return False


def _init_one_rank_group(backend: str, device: torch.device) -> None:
    """A one-process group from the usual environment variables (set here if missing)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    dist.init_process_group(backend, init_method="env://", device_id=device if device.type == "cuda" else None)


def _batch(cfg: SaneConfig, b: int, device: torch.device, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random full windows (no padding) with in-range positions, on the device."""
    ws, d_t = cfg.window_size, cfg.d_t
    x = torch.randn(b, ws, d_t, device=device, generator=gen)
    start = torch.randint(0, cfg.max_positions[0] - ws, (b, 1), device=device, generator=gen)
    n = start + torch.arange(ws, device=device)
    pos = torch.stack([n, n % cfg.max_positions[1], n % cfg.max_positions[2]], dim=-1)
    return {"x_i": x, "x_j": x * 1.05, "mask": torch.ones_like(x, dtype=torch.bool), "pos": pos}


def run(plan: Plan, cfg: SaneConfig, batch_size: int, warmup: int, steps: int) -> dict[str, float]:
    """Time ``steps`` training steps after ``warmup``, print the figures and return them.

    On the plan's device: CUDA for the check; the tests run it on CPU over gloo.
    """
    import torch.distributed as dist

    from sane_ray.model.sane import SaneModel
    from sane_ray.train.config import OptimConfig
    from sane_ray.train.distributed import gather_rows
    from sane_ray.train.fsdp import apply_fsdp, data_parallel_mesh
    from sane_ray.train.optim import build_optimizer
    from sane_ray.train.step import compute_loss, optimizer_step

    cuda = plan.runtime.device_type == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    _init_one_rank_group(plan.runtime.backend, device)
    try:
        torch.manual_seed(0)
        with device:
            model = SaneModel(cfg)
        params = sum(p.numel() for p in model.parameters())
        apply_fsdp(model, data_parallel_mesh(plan.runtime.device_type, 1), plan.runtime.param_dtype,
                   plan.runtime.reduce_dtype)
        optimizer, scheduler = build_optimizer(model, OptimConfig(), warmup + steps)
        batch = _batch(cfg, batch_size, device, torch.Generator(device=device).manual_seed(0))
        noise = torch.Generator(device=device).manual_seed(1)
        kernel = contextlib.nullcontext()
        if plan.attention == "sdpa-flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
        times, losses = [], []
        with kernel:
            for i in range(warmup + steps):
                if i == warmup and cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                sync()
                t0 = time.perf_counter()
                parts = compute_loss(model, batch, cfg, plan.runtime, gather_rows, noise)
                optimizer_step(parts.total, model, optimizer, scheduler, grad_clip=1.0)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                losses.append(parts.total.item())
        tokens = 2 * batch_size * cfg.window_size
        step_s = statistics.median(times)
        tokens_per_s = tokens / step_s
        achieved = tokens_per_s * flops_per_token(cfg, cfg.window_size) / 1e12
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        mfu = achieved / plan.peak_tflops if plan.peak_tflops else float("nan")
        print(f"model       {params / 1e6:,.1f}M parameters, {matmul_params(cfg) / 1e6:,.1f}M in matmuls")
        print(f"batch       {batch_size} windows x 2 views x {cfg.window_size} tokens = {tokens:,} tokens per step")
        print(f"steps       {warmup} warm-up + {steps} timed, median {step_s * 1e3:.1f} ms/step "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}); loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        print(f"throughput  {tokens_per_s:,.0f} tokens/s")
        if cuda:
            print(f"peak memory {peak_gib:.2f} GiB allocated, "
                  f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
        print(f"model FLOPs {flops_per_token(cfg, cfg.window_size) / 1e9:.2f} GFLOP/token, {achieved:,.2f} TFLOP/s")
        print(f"MFU         {mfu:.1%} of {plan.peak_tflops:g} TFLOP/s dense bf16" if plan.peak_tflops
              else "MFU         n/a (device not in the peak table)")
        return {"tokens_per_s": tokens_per_s, "peak_gib": peak_gib, "tflops": achieved, "mfu": mfu,
                "first_loss": losses[0], "last_loss": losses[-1]}
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="resnet")
    p.add_argument("--batch-size", type=int, default=32, help="windows per step (each goes through as 2 views)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    cfg = preset(args.preset)
    print(f"torch {torch.__version__}; preset {args.preset}: d_model {cfg.d_model}, {cfg.n_layers}+{cfg.n_layers} "
          f"layers, {cfg.n_heads} heads, d_z {cfg.d_z}, window {cfg.window_size}, d_t {cfg.d_t}")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing timed. On a CUDA device this check would select:")
        print(make_plan("<device name>", sdpa_flash=True).describe())
        print("(sdpa-flash only where SDPA's flash kernel takes the shapes, else SDPA's own choice; "
              "MFU from the device's entry in BF16_PEAK_TFLOPS)")
        return 0
    device = torch.device("cuda", 0)
    dtype = select_runtime(use_gpu=True).param_dtype
    head_dim = cfg.d_model // cfg.n_heads
    plan = make_plan(torch.cuda.get_device_name(device), sdpa_flash_usable(device, dtype, cfg.n_heads, head_dim))
    print(plan.describe())
    run(plan, cfg, args.batch_size, args.warmup, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
