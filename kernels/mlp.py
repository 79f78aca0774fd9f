"""The block's MLP, ``fc2(GELU(fc1(x))) (+ residual)``, in Triton with the hidden layer kept on chip.

``mlp(x, w1, b1, w2, b2, approximate, residual, scale)`` = ``residual + scale[b] * F.linear(F.gelu(F.linear(x,
w1, b1), approximate=approximate), w2, b2)`` over token-major x (M, C), for narrow layers (C <= MAX_CHANNELS;
the hidden width is free). The hidden activations (4C per token) never reach memory: every kernel computes
them tile by tile from x and the weights, in the forward and again in the backward.

``scale`` (optional, fp32, one value per sample b of x (B, ..., C); row m of the (M, C) token matrix belongs
to sample m // N, N tokens per sample) is the block's drop-path: keep mask / (1 - p), 0 or 1 / (1 - p). It is
applied where the tiles are touched anyway: in the forward's epilogue before the residual is added (one
rounding), and in the backward where the kernels load dy, whose rows they scale before rounding them to the
compute dtype (the branch's output gradient is scale[b] dy; db2 sums it; the residual's gradient stays dy).
Without it drop-path took an elementwise multiply-add over (B, N, C) after the MLP and a multiply in its
backward (on an H200, MLLA-UNet-T's 44 addcmuls and 44 multiplies, of both branches, took about 1 ms of a
30.4 ms step; the MLP branch's are half of them); the fused form adds one fp32 load per token row instead.
In MLLA-UNet-T only two blocks take it (C=64 with drop-path above 0; H200, session 14): their addcmuls and
multiplies (0.14 ms) are gone and the weight-gradient kernel took 0.11 ms longer.

- ``_mlp_fwd_kernel``, one program per BLOCK_M tokens: for each BLOCK_H-wide slice of the hidden layer,
  ``pre = x W1ᵀ + b1`` (fp32), ``GELU(pre)`` cast to the compute dtype, ``acc += GELU(pre) W2ᵀ``; then
  ``(acc + b2) (* scale[b]) (+ residual)`` is stored once.
- ``_mlp_bwd_dx_kernel``, one program per BLOCK_M tokens: per hidden slice, recompute ``pre``, then
  ``dpre = (dy W2) ⊙ GELU'(pre)`` and ``dx += dpre W1``.
- ``_mlp_bwd_dw_kernel``, grid (hidden slices, P token runs): each program keeps fp32 accumulators for its
  slice's rows of dW1 and db1 and columns of dW2 over a contiguous run of tokens (``dW2 += dyᵀ GELU(pre)``,
  ``dW1 += dpreᵀ x``, ``db1 += Σ dpre``, and ``db2 += Σ dy`` in the first slice's programs; dy scaled by
  its sample's scale where there is one) and writes them as one row of fp32 partials;
  ``dwconv.reduce_partials`` sums the P rows in a fixed order (deterministic) into gradients of the weights'
  dtypes.

The GEMM operands are in the compute dtype (x's, or autocast's), accumulation is fp32; fp32 operands use
exact fp32 products (``input_precision="ieee"``). Weights and biases may be fp32 or the compute dtype; they
are cast as they are loaded. Only x (and no hidden activation) is kept for the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..backend import fused_supported, interpreter_enabled
from .dwconv import reduce_partials, row_runs, rows
from .lowp import cast, mma

# The widest layer the kernels take: x's tile (BLOCK_M x C) and the output accumulator stay in registers.
MAX_CHANNELS = 128
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
APPROXIMATIONS = ("none", "tanh")
# Compiled kernels take GELU's one reciprocal as the hardware's approximate division (libdevice's fast_dividef:
# 2 ulp; its argument lies in [1, inf)); the interpreter has no libdevice and divides in numpy.
_FAST_DIVIDE = tl.constexpr(not interpreter_enabled())
LOG2E = tl.constexpr(1.4426950408889634)
INV_SQRT2 = tl.constexpr(0.7071067811865476)

# Launch constants (tokens per program, hidden slice width, warps) by kernel: the best of a sweep on an H200
# at 2M tokens, C=64 (.gpu/mlp_sweep.py, session 5).
FWD_BLOCK_M, FWD_BLOCK_H = 64, 32
DX_BLOCK_M, DX_BLOCK_H = 64, 32
DW_BLOCK_M, DW_BLOCK_H = 64, 64
WARPS_BY_CHANNELS = {32: 4, 64: 4, 128: 8}
# Weight-gradient programs per SM over all hidden slices; INTERPRETER_RUNS token runs off CUDA, so that the
# tests make programs walk several token blocks.
DW_PROGRAMS_PER_SM = 4
INTERPRETER_RUNS = 3

__all__ = ["MAX_CHANNELS", "mlp", "mlp_bwd", "mlp_fwd", "supported"]


@triton.jit
def _gelu_and_grad(pre, TANH: tl.constexpr, GRAD: tl.constexpr):
    """GELU(pre) and, when GRAD, its derivative (exact erf form, or the tanh approximation).

    The exact form's Phi(pre) = erfc(-pre / sqrt 2) / 2 takes erfc from the Chebyshev fit of Numerical Recipes
    ("erfcc": relative error below 1.2e-7 for every argument): one reciprocal, one exponential and ten fused
    multiply-adds per element, no cancellation where pre is negative (1 + erf loses its digits there) and no
    per-element choice between two coefficient sets, which libdevice's erff makes with two moves per coefficient.
    In fp32 GELU is within 4e-7 of its float64 value everywhere and its derivative within 3e-7 (PyTorch's own fp32
    GELU: 1.2e-6). Compiled offline for sm_90a (Triton 3.9, bf16, C=64), the kernels' loops shrank from 704, 868
    and 2162 SASS instructions to 498, 577 and 1587 (forward, dx, weight gradients): they are bound by
    instruction issue (Nsight Compute, session 6)."""
    if TANH:
        k0: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        k1: tl.constexpr = 0.044715
        t = 2.0 * tl.sigmoid(2.0 * k0 * (pre + k1 * pre * pre * pre)) - 1.0  # tanh(k0 (pre + k1 pre^3))
        cdf = 0.5 * (1.0 + t)
        grad = cdf
        if GRAD:
            grad = cdf + 0.5 * pre * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * pre * pre)
    else:
        # erfc(z) = t exp(P(t) - z^2), t = 1 / (1 + z / 2), P the fit's degree-9 polynomial; at z = |pre| / sqrt 2,
        # as a power of two: erfc(z) / 2 = t 2^(L P(t) - 1 - L pre^2 / 2), L = log2(e), its constants folded
        if _FAST_DIVIDE:
            t = libdevice.fast_dividef(1.0, 1.0 + tl.abs(pre) * (0.5 * INV_SQRT2))
        else:
            t = 1.0 / (1.0 + tl.abs(pre) * (0.5 * INV_SQRT2))
        p = (0.17087277 * LOG2E) * t + (-0.82215223 * LOG2E)
        p = p * t + (1.48851587 * LOG2E)
        p = p * t + (-1.13520398 * LOG2E)
        p = p * t + (0.27886807 * LOG2E)
        p = p * t + (-0.18628806 * LOG2E)
        p = p * t + (0.09678418 * LOG2E)
        p = p * t + (0.37409196 * LOG2E)
        p = p * t + (1.00002368 * LOG2E)
        p = p * t + (-1.26551223 * LOG2E - 1.0)
        half_erfc = t * tl.exp2(p - pre * pre * (0.5 * LOG2E))
        cdf = tl.where(pre >= 0, 1.0 - half_erfc, half_erfc)
        grad = cdf
        if GRAD:
            grad = cdf + pre * 0.3989422804014327 * tl.exp2(pre * pre * (-0.5 * LOG2E))  # + pre * pdf(pre)
    return pre * cdf, grad


@triton.jit
def _tile(p, o_m, m_m, s_m, o_c, m_c, DT: tl.constexpr):
    """The [BLOCK_M, BLOCK_C] tile of rows o_m of a token-major matrix (row stride s_m), zero off the mask,
    in the compute dtype DT."""
    return cast(tl.load(p + o_m.to(tl.int64)[:, None] * s_m + o_c[None, :], mask=m_m[:, None] & m_c[None, :],
                        other=0.0), DT)


@triton.jit
def _w1_slice(w1, b1, o_h, m_h, o_c, m_c, C, DT: tl.constexpr):
    """W1's rows o_h transposed ([BLOCK_C, BLOCK_H], DT) and b1's (fp32)."""
    w1_t = cast(tl.load(w1 + o_h.to(tl.int64)[None, :] * C + o_c[:, None], mask=m_c[:, None] & m_h[None, :],
                        other=0.0), DT)
    return w1_t, tl.load(b1 + o_h, mask=m_h, other=0.0).to(tl.float32)


@triton.jit
def _hidden_slice(x_t, w1, b1, o_h, m_h, o_c, m_c, C, DT: tl.constexpr, PRECISION: tl.constexpr):
    """W1's slice transposed ([BLOCK_C, BLOCK_H], DT) and ``pre = x W1ᵀ + b1`` for the slice (fp32)."""
    w1_t, b1_h = _w1_slice(w1, b1, o_h, m_h, o_c, m_c, C, DT)
    return w1_t, mma(x_t, w1_t, None, PRECISION) + b1_h[None, :]


@triton.jit
def _w2_slice(w2, o_h, m_h, o_c, m_c, HID):
    """W2[:, slice] ([BLOCK_C, BLOCK_H]) in its own dtype."""
    return tl.load(w2 + o_c.to(tl.int64)[:, None] * HID + o_h[None, :], mask=m_c[:, None] & m_h[None, :],
                   other=0.0)


@triton.jit
def _row_scale(scale, o_m, m_m, N):
    """The fp32 scale of each row's sample (row // N tokens per sample), 0 off the mask: [BLOCK_M]. A token
    block may straddle samples, so the sample is taken row by row."""
    return tl.load(scale + o_m // N, mask=m_m, other=0.0)


@triton.jit
def _dy_tile(dy, scale, o_m, m_m, s_dy, o_c, m_c, N, HAS_SCALE: tl.constexpr, DT: tl.constexpr):
    """The branch's output gradient tile in DT: dy's rows o_m, each times its sample's scale when HAS_SCALE
    (in fp32, then rounded once), zero off the mask."""
    if HAS_SCALE:
        t = _tile(dy, o_m, m_m, s_dy, o_c, m_c, tl.float32) * _row_scale(scale, o_m, m_m, N)[:, None]
        return cast(t, DT)
    return _tile(dy, o_m, m_m, s_dy, o_c, m_c, DT)


@triton.jit
def _token_block(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Token offsets and mask of this program's BLOCK_M tokens, channel offsets and mask."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_C)
    return o_m, o_m < M, o_c, o_c < C


@triton.jit
def _store_tile(p, v, o_m, m_m, s_m, o_c, m_c):
    """Store the [BLOCK_M, BLOCK_C] tile v at rows o_m of a token-major matrix (row stride s_m), rounded to
    its dtype."""
    tl.store(p + o_m.to(tl.int64)[:, None] * s_m + o_c[None, :], cast(v, p.dtype.element_ty),
             mask=m_m[:, None] & m_c[None, :])


@triton.jit
def _mlp_fwd_kernel(
    x, w1, b1, w2, b2, res, scale, y, M, C, HID, N, s_x, s_res, s_y,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, TANH: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_m, m_m, o_c, m_c = _token_block(M, C, BLOCK_M, BLOCK_C)
    x_t = _tile(x, o_m, m_m, s_x, o_c, m_c, DT)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < HID
        _, pre = _hidden_slice(x_t, w1, b1, o_h, m_h, o_c, m_c, C, DT, PRECISION)
        act, _ = _gelu_and_grad(pre, TANH, False)
        w2_t = tl.trans(cast(_w2_slice(w2, o_h, m_h, o_c, m_c, HID), DT))
        acc = mma(cast(act, DT), w2_t, acc, PRECISION)
    acc += tl.load(b2 + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= _row_scale(scale, o_m, m_m, N)[:, None]
    if HAS_RES:
        acc += _tile(res, o_m, m_m, s_res, o_c, m_c, tl.float32)
    _store_tile(y, acc, o_m, m_m, s_y, o_c, m_c)


@triton.jit
def _mlp_bwd_dx_kernel(
    x, dy, scale, w1, b1, w2, dx, M, C, HID, N, s_x, s_dy, s_dx,
    HAS_SCALE: tl.constexpr, TANH: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    o_m, m_m, o_c, m_c = _token_block(M, C, BLOCK_M, BLOCK_C)
    x_t = _tile(x, o_m, m_m, s_x, o_c, m_c, DT)
    dy_t = _dy_tile(dy, scale, o_m, m_m, s_dy, o_c, m_c, N, HAS_SCALE, DT)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        o_h = h0 + tl.arange(0, BLOCK_H)
        m_h = o_h < HID
        w1_t, pre = _hidden_slice(x_t, w1, b1, o_h, m_h, o_c, m_c, C, DT, PRECISION)
        _, gelu_grad = _gelu_and_grad(pre, TANH, True)
        dh = mma(dy_t, cast(_w2_slice(w2, o_h, m_h, o_c, m_c, HID), DT), None, PRECISION)
        acc = mma(cast(dh * gelu_grad, DT), tl.trans(w1_t), acc, PRECISION)
    _store_tile(dx, acc, o_m, m_m, s_dx, o_c, m_c)


@triton.jit
def _mlp_bwd_dw_kernel(
    x, dy, scale, w1, b1, w2, part, M, C, HID, N, s_x, s_dy, s_part, rows_per_run,
    HAS_SCALE: tl.constexpr, TANH: tl.constexpr, DT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Partials row p = program_id(1): [dW1 (HID x C) | dW2 (C x HID) | db1 (HID) | db2 (C)], each program
    writing its hidden slice's part (db2: the first slice's programs)."""
    i_h, i_p = tl.program_id(0), tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < HID
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    w1_t, b1_h = _w1_slice(w1, b1, o_h, m_h, o_c, m_c, C, DT)
    w2_s = cast(_w2_slice(w2, o_h, m_h, o_c, m_c, HID), DT)
    acc_w1 = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    acc_w2 = tl.zeros([BLOCK_C, BLOCK_H], dtype=tl.float32)
    acc_b1 = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_b2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = i_p * rows_per_run
    row_end = tl.minimum(row_start + rows_per_run, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < row_end
        x_t = _tile(x, o_m, m_m, s_x, o_c, m_c, DT)
        # zero rows off the run: they add nothing below
        dy_t = _dy_tile(dy, scale, o_m, m_m, s_dy, o_c, m_c, N, HAS_SCALE, DT)
        pre = mma(x_t, w1_t, None, PRECISION) + b1_h[None, :]
        act, gelu_grad = _gelu_and_grad(pre, TANH, True)
        acc_w2 = mma(tl.trans(dy_t), cast(act, DT), acc_w2, PRECISION)
        dpre = mma(dy_t, w2_s, None, PRECISION) * gelu_grad
        acc_w1 = mma(tl.trans(cast(dpre, DT)), x_t, acc_w1, PRECISION)
        acc_b1 += tl.sum(dpre, 0)
        acc_b2 += tl.sum(dy_t.to(tl.float32), 0)
    row = part + i_p.to(tl.int64) * s_part
    tl.store(row + o_h[:, None] * C + o_c[None, :], acc_w1, mask=m_h[:, None] & m_c[None, :])
    tl.store(row + HID * C + o_c[:, None] * HID + o_h[None, :], acc_w2, mask=m_c[:, None] & m_h[None, :])
    tl.store(row + 2 * HID * C + o_h, acc_b1, mask=m_h)
    if i_h == 0:
        tl.store(row + 2 * HID * C + HID + o_c, acc_b2, mask=m_c)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and work buffer of this module is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_args(C: int, dtype: torch.dtype) -> dict:
    block_c = max(16, triton.next_power_of_2(C))
    return {"DT": _TL_DTYPES[dtype], "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "BLOCK_C": block_c, "num_warps": WARPS_BY_CHANNELS[max(32, block_c)]}


def _samples(x: Tensor, M: int, scale: Tensor | None) -> tuple[Tensor | None, int]:
    """scale as the kernels read it (contiguous) and N, the tokens per sample of x (B, ..., C): row m of the
    (M, C) token matrix belongs to sample m // N. N is 1 without a scale or tokens (nothing divides by it)."""
    if scale is None or M == 0:
        return scale, 1
    return scale.contiguous(), M // x.shape[0]


def mlp_fwd(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, residual: Tensor | None,
            scale: Tensor | None, tanh: bool, dtype: torch.dtype) -> Tensor:
    """Launch the forward: x (..., C) -> (..., C) in dtype (the compute dtype, promoted with the residual's)."""
    C, HID = x.shape[-1], w1.shape[0]
    x2 = rows(x)
    M = x2.shape[0]
    scale, N = _samples(x, M, scale)
    w1, b1, w2, b2 = (t.to(dtype) for t in (w1, b1, w2, b2))  # the kernels' weight loads are then plain copies
    out_dtype = dtype if residual is None else torch.promote_types(dtype, residual.dtype)
    y = _empty((M, C), out_dtype, x.device)
    r2 = rows(residual) if residual is not None else y
    if M:
        _mlp_fwd_kernel[(triton.cdiv(M, FWD_BLOCK_M),)](
            x2, w1, b1, w2, b2, r2, y if scale is None else scale, y, M, C, HID, N, x2.stride(0), r2.stride(0),
            y.stride(0), HAS_RES=residual is not None, HAS_SCALE=scale is not None, TANH=tanh,
            BLOCK_M=FWD_BLOCK_M, BLOCK_H=FWD_BLOCK_H, **_launch_args(C, dtype),
        )
    return y.reshape(x.shape)


def _dw_runs(M: int, n_slices: int, device: torch.device) -> tuple[int, int]:
    """(token runs P, rows per run): whole DW_BLOCK_M blocks, about DW_PROGRAMS_PER_SM programs per SM over
    all hidden slices (INTERPRETER_RUNS off CUDA), no run empty."""
    return row_runs(M, DW_BLOCK_M, device, DW_PROGRAMS_PER_SM, INTERPRETER_RUNS, n_slices)


def mlp_bwd(dy: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, scale: Tensor | None,
            tanh: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward of the MLP branch for the output gradient dy (times scale[b] when given): (dx in
    x's dtype, dw1, db1, dw2, db2 in the dtypes of w1, b1, w2, b2)."""
    C, HID = x.shape[-1], w1.shape[0]
    x2, dy2 = rows(x), rows(dy)
    M = x2.shape[0]
    scale, N = _samples(x, M, scale)
    dx = _empty((M, C), x.dtype, x.device)
    args = _launch_args(C, dtype)
    args.update(HAS_SCALE=scale is not None, TANH=tanh)
    scale_arg = dx if scale is None else scale
    grad_dtypes = (w1.dtype, w2.dtype, b1.dtype, b2.dtype)
    w1, b1, w2 = (t.to(dtype) for t in (w1, b1, w2))
    if M:
        _mlp_bwd_dx_kernel[(triton.cdiv(M, DX_BLOCK_M),)](
            x2, dy2, scale_arg, w1, b1, w2, dx, M, C, HID, N, x2.stride(0), dy2.stride(0), dx.stride(0),
            BLOCK_M=DX_BLOCK_M, BLOCK_H=DX_BLOCK_H, **args,
        )
    n_slices = triton.cdiv(HID, DW_BLOCK_H)
    n_runs, rows_per_run = _dw_runs(M, n_slices, x.device)
    part = _empty((n_runs, 2 * HID * C + HID + C), torch.float32, x.device)
    _mlp_bwd_dw_kernel[(n_slices, n_runs)](
        x2, dy2, scale_arg, w1, b1, w2, part, M, C, HID, N, x2.stride(0), dy2.stride(0), part.stride(0),
        rows_per_run, BLOCK_M=DW_BLOCK_M, BLOCK_H=DW_BLOCK_H, **args,
    )
    shapes = (tuple(w1.shape), tuple(w2.shape), (HID,), (C,))
    dw1, dw2, db1, db2 = reduce_partials(part, list(zip(shapes, grad_dtypes, strict=True)))
    return dx.reshape(x.shape), dw1, db1, dw2, db2


_FWD_SCHEMA = ("(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? residual, Tensor? scale, "
               "bool tanh, ScalarType dtype) -> Tensor")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? scale, bool tanh, "
               "ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
mlp_fwd_op = torch.library.custom_op("mlla_fast::mlp_fwd", mlp_fwd, mutates_args=(), schema=_FWD_SCHEMA)
mlp_bwd_op = torch.library.custom_op("mlla_fast::mlp_bwd", mlp_bwd, mutates_args=(), schema=_BWD_SCHEMA)


@mlp_fwd_op.register_fake
def _(x, w1, b1, w2, b2, residual, scale, tanh, dtype):
    return x.new_empty(x.shape, dtype=dtype if residual is None else torch.promote_types(dtype, residual.dtype))


@mlp_bwd_op.register_fake
def _(dy, x, w1, b1, w2, b2, scale, tanh, dtype):
    return x.new_empty(x.shape), w1.new_empty(w1.shape), b1.new_empty(b1.shape), w2.new_empty(w2.shape), \
        b2.new_empty(b2.shape)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, scale, tanh, dtype = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, scale)
    ctx.args = (tanh, dtype)
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, dy):
    x, w1, b1, w2, b2, scale = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = mlp_bwd_op(dy, x, w1, b1, w2, b2, scale, *ctx.args)
    dres = None if ctx.residual_dtype is None else dy.to(ctx.residual_dtype)  # the residual is not scaled
    return dx, dw1, db1, dw2, db2, dres, None, None, None


mlp_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def supported(x: Tensor, dtype: torch.dtype) -> str | None:
    """None when the kernels compute the MLP of x in dtype; otherwise why not."""
    reason = fused_supported(x)
    if reason is not None:
        return reason
    if dtype not in ACTIVATION_DTYPES:
        return f"the MLP kernels compute in {ACTIVATION_DTYPES}, got {dtype}"
    if x.shape[-1] > MAX_CHANNELS:
        return f"the MLP kernels take at most {MAX_CHANNELS} channels, got {x.shape[-1]}"
    return None


def _check_inputs(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, residual: Tensor | None,
                  scale: Tensor | None, approximate: str, dtype: torch.dtype) -> None:
    named = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "residual": residual, "scale": scale}
    for name, t in named.items():
        if not isinstance(t, Tensor) and not (name in ("residual", "scale") and t is None):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape (..., C), got a scalar")
    C = x.shape[-1]
    if w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] < 1:
        raise ValueError(f"w1: expected shape (hidden, {C}) for x of {C} channels, got {tuple(w1.shape)}")
    HID = w1.shape[0]
    expected = {"b1": (HID,), "w2": (C, HID), "b2": (C,)}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(named[name].shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if scale is not None:
        if x.dim() < 2:
            raise ValueError(f"scale: needs x of shape (B, ..., C) with one scale per sample, got x of shape "
                             f"{tuple(x.shape)}")
        if tuple(scale.shape) != (x.shape[0],):
            raise ValueError(f"scale: expected shape (B,) = ({x.shape[0]},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(scale.shape)}")
        if scale.dtype != torch.float32:
            raise ValueError(f"scale: expected torch.float32, got {scale.dtype}")
        if scale.requires_grad:
            raise ValueError("scale: expected a constant (a drop-path mask); its gradient is not computed")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate: expected one of {APPROXIMATIONS}, got {approximate!r}")
    reason = supported(x, dtype)
    if reason is not None:
        raise ValueError(f"x: {reason}")
    for name, t in named.items():
        if t is not None and t.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"{name}: expected one of {ACTIVATION_DTYPES}, got {t.dtype}")
        if name in ("w1", "w2") and not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous weight, got strides {t.stride()}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"expected all tensors on one device, got {devices}")


def mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, approximate: str = "none",
        residual: Tensor | None = None, scale: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """``residual + scale[b] * fc2(GELU(fc1(x)))`` with the hidden layer on chip (see the module docstring).

    Args:
        x: (..., C) tokens, C <= MAX_CHANNELS, channels contiguous (otherwise copied).
        w1, b1: fc1's (HID, C) weight (contiguous) and (HID,) bias; w2, b2: fc2's (C, HID) and (C,).
            float32 or the compute dtype; their gradients come back in their own dtypes.
        approximate: GELU's "none" (erf) or "tanh", as ``nn.GELU``.
        residual: None or a tensor of x's shape added to the output (its gradient is the output's).
        scale: None or a float32 (B,) tensor for x (B, ..., C) on x's device: sample b's MLP output (not the
            residual) is multiplied by scale[b], and so is its gradient; drop-path's keep mask / (1 - p).
            A constant: no gradient is computed for it.
        dtype: the GEMMs' operand dtype (float32, bfloat16, float16); None: x's dtype.

    Returns:
        (..., C) in dtype (promoted with the residual's dtype when there is one). Differentiable in x, the
        weights, the biases and the residual; a torch custom op (``mlla_fast::mlp_fwd`` and ``_bwd``).
    """
    dtype = x.dtype if dtype is None else dtype
    _check_inputs(x, w1, b1, w2, b2, residual, scale, approximate, dtype)
    return mlp_fwd_op(x, w1, b1, w2, b2, residual, scale, approximate == "tanh", dtype)
