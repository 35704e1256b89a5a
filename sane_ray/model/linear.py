"""``nn.Linear`` whose fp32 CPU matmuls run on oneDNN instead of MKL.

Linear layers take ~80% of a SANE training step on CPU. PyTorch's CPU wheels send fp32
matmuls to MKL's sgemm, which on AMD CPUs runs a slower code path: ~95 GFLOP/s per core
on the 2-core EPYC (AVX-512) box we benchmark on, where oneDNN reaches ~220 GFLOP/s for
the same exact-fp32 products (forward, input gradient and weight gradient alike).
:class:`Linear` routes those three products through oneDNN's linear primitive (the op
Inductor uses on CPU) and falls back to ``F.linear`` everywhere else: GPU, other
dtypes, autocast, or a torch build without oneDNN.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and its dense linear op."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return True


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b_t.T (+ bias)`` for 2-d fp32 CPU tensors (strided views are fine)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = _onednn_mm(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            # oneDNN copies its (transposed) first operand to a contiguous buffer: transpose
            # the narrower of grad (tokens x out) and x (tokens x in), computing dW or dW^T.
            if grad.shape[1] <= x.shape[1]:
                grad_w = _onednn_mm(grad.t(), x.t())
            else:
                grad_w = _onednn_mm(x.t(), grad.t()).t()
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN only for fp32 CPU inputs and weights outside autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor or other subclass
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the oneDNN path for fp32 CPU tensors of any leading shape."""
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*lead, weight.shape[0])


class Linear(nn.Linear):
    """Drop-in ``nn.Linear`` (same parameters and state-dict keys) using :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
