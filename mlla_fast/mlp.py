"""The block's MLP (fc1 -> GELU -> fc2) over token chunks, recomputed chunk by chunk in the backward.

The MLP's hidden layer is 4C wide. Run over all tokens at once, its forward holds fc1's output and the
GELU of it (8C per token) and its backward four such tensors (the recomputed fc1 output and GELU, their
gradients): at 1024² tokens, batch 2, C=64 in bf16 that is 4 GiB of transients, more than everything
else the block keeps. ``chunked_mlp`` computes the MLP over chunks of about ``HIDDEN_CHUNK`` hidden
elements, keeps only its input for the backward, and in the backward recomputes each chunk's hidden
activations, takes their gradients, and accumulates the weight gradients in fp32 (fp64 for fp64
weights). The hidden transients shrink to one chunk's; the price is one extra fc1 GEMM and GELU, as
with activation checkpointing.

For narrow layers (C <= TRITON_MLP_MAX_CHANNELS) in bf16/fp16 the block runs ``triton_mlp`` instead: the
Triton kernels of ``kernels/mlp.py``, which never write the hidden layer to memory at all.

Autocast is honoured explicitly: under autocast the GEMMs run in the autocast dtype with the weights
cast once per call, as ``F.linear`` would; the backward uses the dtype the forward used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .casts import cast
from .linear import bias_grad, chunk_ranges, compute_dtype, matmul_to

# Hidden elements per chunk: 128 MiB in bf16. With chunks of 2^24, a 512² block's fwd+bwd (batch 2, bf16)
# took 11.4 ms on an H200 against 9.75 ms with one unchunked recompute; larger chunks mean fewer, larger
# GEMMs and still only a few chunks' transients at large grids.
HIDDEN_CHUNK = 1 << 26


def _chunks(tokens: int, hidden: int) -> list[tuple[int, int]]:
    return chunk_ranges(tokens, hidden, HIDDEN_CHUNK)


class _ChunkedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, approximate: str) -> Tensor:
        dtype = compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            w1c, b1c, w2c, b2c = (cast(t, dtype) for t in (w1, b1, w2, b2))
            x = h.reshape(-1, h.shape[-1])
            out = torch.empty(x.shape[0], w2.shape[0], dtype=dtype, device=h.device)
            for s, e in _chunks(x.shape[0], w1.shape[0]):
                hidden = F.gelu(F.linear(x[s:e].to(dtype), w1c, b1c), approximate=approximate)
                torch.addmm(b2c, hidden, w2c.t(), out=out[s:e])
        # the weights as the GEMMs took them (for fp32 weights under autocast: bf16/fp16 copies, a few KB)
        ctx.save_for_backward(h, w1c, b1c, w2c)
        ctx.dtype, ctx.approximate = dtype, approximate
        ctx.param_dtypes = (w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return out.reshape(*h.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dout: Tensor):
        h, w1c, b1c, w2c = ctx.saved_tensors
        dtype, approximate = ctx.dtype, ctx.approximate
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.param_dtypes
        x = h.reshape(-1, h.shape[-1])
        dy = dout.reshape(-1, dout.shape[-1])
        dx = torch.empty_like(x)
        acc = torch.promote_types(w1_dtype, torch.float32)  # weight gradients summed over chunks in fp32 (or fp64)
        dw1 = dw2 = db1 = None
        db2 = bias_grad(dy, b2_dtype)  # over all tokens at once: fc2's output gradient is dy itself
        for s, e in _chunks(x.shape[0], w1c.shape[0]):
            xc, dyc = x[s:e].to(dtype), dy[s:e].to(dtype)
            pre = F.linear(xc, w1c, b1c)
            dw2_chunk = matmul_to(dyc.t(), F.gelu(pre, approximate=approximate), acc)
            dpre = torch.ops.aten.gelu_backward(dyc @ w2c, pre, approximate=approximate)
            del pre
            dw1_chunk = matmul_to(dpre.t(), xc, acc)
            db1_chunk = bias_grad(dpre, acc)
            if dw1 is None:
                dw1, dw2, db1 = dw1_chunk, dw2_chunk, db1_chunk
            else:
                dw1, dw2, db1 = dw1 + dw1_chunk, dw2 + dw2_chunk, db1 + db1_chunk
            if dx.dtype == dpre.dtype:
                torch.mm(dpre, w1c, out=dx[s:e])
            else:
                dx[s:e] = dpre @ w1c
        if dw1 is None:  # no tokens
            dw1 = torch.zeros(w1c.shape, dtype=acc, device=h.device)
            dw2 = torch.zeros(w2c.shape, dtype=acc, device=h.device)
            db1 = torch.zeros(b1c.shape, dtype=acc, device=h.device)
        return dx.reshape(h.shape), dw1.to(w1_dtype), db1.to(b1_dtype), dw2.to(w2_dtype), db2, None


def mlp_is_random(mlp: nn.Module) -> bool:
    """Whether the MLP draws random numbers in this call: its dropout (its only random op) is active."""
    return mlp.training and mlp.drop.p > 0


def chunked_mlp_supported(mlp: nn.Module, h: Tensor) -> bool:
    """Whether ``chunked_mlp`` computes exactly this MLP here: fc1 -> GELU -> fc2 with biases and no active
    dropout, and inputs the GEMMs accept (the weights' dtype, or any dtype under autocast)."""
    return (isinstance(getattr(mlp, "act", None), nn.GELU) and mlp.fc1.bias is not None and mlp.fc2.bias is not None
            and not mlp_is_random(mlp)
            and (torch.is_autocast_enabled(h.device.type) or h.dtype == mlp.fc1.weight.dtype))


def chunked_mlp(mlp: nn.Module, h: Tensor) -> Tensor:
    """``mlp(h)`` over token chunks, keeping only h for the backward (see the module docstring)."""
    return _ChunkedMLP.apply(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.act.approximate)


# The widest layer the block sends to the Triton MLP. On an H200 (bf16, session 5) it beat the cuBLAS chunks
# for C=64 at 512² and 1024² (one block, batch 2) but cost time in MLLA-UNet-T's 224² step, whose C=128
# stages it also ran; the kernels themselves take up to kernels.mlp.MAX_CHANNELS. Measured again in session 14
# (H200, with drop-path's scale in the Triton MLP): the U-Net-T step in a CUDA graph took 30.5 ms with the C=128
# stages on the Triton MLP against 29.0 ms on cuBLAS (its weight-gradient kernel: 2.45 ms in 10 calls).
TRITON_MLP_MAX_CHANNELS = 64


def triton_mlp_supported(mlp: nn.Module, h: Tensor) -> bool:
    """Whether ``triton_mlp`` runs this MLP here: as for ``chunked_mlp``, plus C <= TRITON_MLP_MAX_CHANNELS
    and, on CUDA, a bf16/fp16 compute dtype (Triton's exact fp32 products use no tensor cores: fp32 stays on
    cuBLAS there)."""
    if not chunked_mlp_supported(mlp, h) or h.shape[-1] > TRITON_MLP_MAX_CHANNELS:
        return False
    dtype = compute_dtype(h)
    if h.is_cuda and dtype == torch.float32:
        return False
    from .kernels.mlp import supported

    return supported(h, dtype) is None


def triton_mlp(mlp: nn.Module, h: Tensor, residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """``residual + scale[b] * mlp(h)`` on the Triton MLP kernels (hidden layer on chip; see ``kernels/mlp.py``);
    scale, fp32 (B,) for h (B, N, C), is drop-path's per-sample keep mask / (1 - p), applied in the kernels."""
    from .kernels.mlp import mlp as fused_mlp

    return fused_mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.act.approximate, residual,
                     scale, dtype=compute_dtype(h))
