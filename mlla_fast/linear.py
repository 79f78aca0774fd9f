"""``F.linear`` whose bias gradient is a Triton column sum, for the fused block's Linear layers.

Autograd's backward of ``F.linear`` sums the output gradient over tokens with PyTorch's reduce kernel: for a
bf16 (M, N) gradient with M in the hundred thousands and N = 64..512 that runs at about a quarter of the
memory bandwidth (on an H200, 87 such sums took 3.1 ms of a 41 ms MLLA-UNet-T training step at 224²,
batch 48). ``linear`` computes the same forward and the same dx and dW GEMMs, and the bias gradient with
``kernels.column_sum`` (fp32 accumulation, deterministic).

Autocast is honoured as in ``mlla_fast.mlp``: under autocast the GEMM runs in the autocast dtype with the
weight and bias cast once per call, as ``F.linear`` would, and the backward uses the dtype the forward used.
Gradients come back in the dtypes of x, the weight and the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import fused_supported
from .casts import cast


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a GEMM on x runs in here: autocast's dtype where autocast is on for x's device, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), cast(weight, dtype)
            y = F.linear(xc, wc, None if bias is None else cast(bias, dtype))
        ctx.save_for_backward(xc, wc)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        xc, wc = ctx.saved_tensors
        dy2 = dy.to(wc.dtype).reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ wc).to(ctx.x_dtype).reshape(*dy.shape[:-1], wc.shape[1])
        if ctx.needs_input_grad[1]:
            dw = matmul_to(dy2.t(), xc.reshape(-1, xc.shape[-1]), ctx.weight_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = bias_grad(dy2, ctx.bias_dtype)
        return dx, dw, db


def matmul_to(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``(a @ b).to(dtype)`` for 2-D a, b: where cuBLAS can write fp32 straight from bf16/fp16 operands (CUDA,
    ``out_dtype``), a weight gradient's fp32 result comes out of the GEMM itself, without the rounding to
    a's dtype and the cast kernel after it."""
    if dtype == torch.float32 and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).to(dtype)


def chunk_ranges(n: int, width: int, budget: int) -> list[tuple[int, int]]:
    """[start, end) ranges over n rows of ``width`` elements each, about ``budget`` elements (at least one row)
    per range: the chunks of the chunked MLP and of the fused output head."""
    per = max(1, budget // max(1, width))
    return [(s, min(s + per, n)) for s in range(0, n, per)]


def bias_grad(dy: Tensor, dtype: torch.dtype) -> Tensor:
    """``dy.sum(0)`` of a 2-D dy in dtype, accumulated in fp32 (fp64 for fp64 dy): the Triton column sum
    where the fused kernels run, else PyTorch's sum."""
    if fused_supported(dy) is None:
        from .kernels.column_sum import column_sum

        return column_sum(dy if dy.shape[-1] <= 1 or dy.stride(-1) == 1 else dy.contiguous(), dtype)
    return dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).to(dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (autocast honoured) with the bias gradient summed by the Triton column
    sum. x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N)."""
    return _Linear.apply(x, weight, bias)
