"""Fused depthwise 3x3 stencil kernels of the MLLA block, forward and backward.

Two ops, each mirroring its reference in ``reference/ops.py`` argument for argument:

* ``cpe_residual_norm(x, cpe_weight, cpe_bias, norm_weight, norm_bias, hw, eps)`` returns
  ``(r, LayerNorm(r))`` with ``r = x + dwconv3x3(x)``: one pass over a tile of tokens that holds all
  C channels, so the LayerNorm is a row reduction in registers.
* ``dwconv_silu(x, weight, bias, hw)`` returns ``SiLU(dwconv3x3(x))``.

Layout: tokens ``(B, N, C)`` with ``N = H * W`` row-major over the grid. Every stencil kernel walks the grid by
row tiles: a tile is TW tokens of one grid row (and, for the channel-independent kernels, a block of
channels), the tiles are numbered strip by strip (a strip: one sample's TW-wide column block, top row to bottom
row), and each program walks down a contiguous run of them keeping x's 3x3 neighbourhood of the current row in
registers (rows y - 1, y and y + 1, each also shifted a column either way), so that a step loads only row
y + 1 at three column shifts. Inputs may be views whose token and batch strides are arbitrary as long as
channels are contiguous.

Backward (``g`` is the gradient with respect to the convolution's output, ``w`` the 3x3 taps):

* ``dx[q] = sum_tap w[tap] * g[q - tap]`` (the transposed stencil, plus ``g[q]`` for the residual),
  ``dw[tap] = sum_p g[p] * x[p + tap]``, ``db = sum_p g[p]``;
* cpe: ``g = dr + rstd * (gamma * dh - mean_c(gamma * dh) - xhat * mean_c(gamma * dh * xhat))``
  with ``xhat = (r - mean) * rstd`` and ``r`` itself recomputed from the saved ``x`` (the forward's
  tap order and rounding), so the op keeps only its input for the backward; the same kernel can
  write ``h = LayerNorm(r)`` again on the way (``cpe_residual_norm_bwd_h``), for a consumer of h
  that keeps only x (``mlla_fast/norm_linear.py``), and sum dr over tokens, the gradient of a bias the
  forward added to the r it stores (``residual_bias``: the block's out_proj bias, carried by the residual
  stream so that out_proj's GEMM adds the branch to it; ``residual_scale`` scales it, and dr in that sum, per
  sample: drop-path's factor on the branch);
* silu: ``g = dy * s * (1 + pre * (1 - s))`` with ``s = sigmoid(pre)`` and ``pre`` recomputed.

A first kernel computes ``g`` per tile (stored in the activation dtype, as PyTorch's own backward does)
together with per-program fp32 partials of the parameter gradients; a second kernel applies the transposed
stencil to ``g``. In the cpe one the window's nine tiles give both the recomputed ``r`` and the weight
gradient's products. The partials are summed over programs by one small kernel per backward
(``reduce_partials``) in a fixed order, so the results are deterministic (no atomics). Accumulation is fp32
throughout.
"""

import itertools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import fused_supported, multiprocessors
from ..reference.ops import check_tokens

CHANNEL_MULTIPLE = 32
MAX_NORM_CHANNELS = 4096
# Elements (tokens x channels) of one program's tile. Measured on an H200 (the stencil kernels' GPU time in
# a MLLA-UNet-T training step, 224², batch 48, bf16): 512 -> 8.8 ms, 2048 -> 27 ms. Smaller tiles mean
# fewer warps per program (the backward kernels hold ~4 elements per thread), so a program's LayerNorm
# row sums and barriers span fewer warps and more programs fit on an SM at once.
TILE_ELEMENTS = 512
PARTIAL_PROGRAMS = 1024
# The cpe backward's programs each walk a run of grid rows: CPE_BWD_PROGRAMS_PER_SM programs per SM on a GPU
# (PARTIAL_PROGRAMS in the interpreter) and CPE_BWD_MAXNREG, ptxas's register cap (None: ptxas's choice).
# At 168 registers 3 programs of 4 warps fit on an SM: one wave, the fewest window refills.
# Measured on an H200 (the kernel's GPU time in a MLLA-UNet-T training step, 224², batch 48, bf16; the old
# square-tile kernel: 3.78 ms): 3 per SM 2.07 ms, 6 per SM 2.59 ms, 9 per SM 3.11 ms; capped at 128 registers
# (spilling 84 bytes a thread): 4 per SM 2.25 ms, 8 per SM 2.97 ms.
CPE_BWD_PROGRAMS_PER_SM = 3
CPE_BWD_MAXNREG: int | None = 168
# Whether the cpe backward's row walk prefetches: each step issues the next tile's loads (x's row below it, dh,
# dr) before its own arithmetic (the kernel's PREFETCH), so that two tiles' loads are in flight per program. The
# prefetched tiles take registers: uncapped, 186-208 (2 programs per SM), and the kernel took 2.54 ms of a
# MLLA-UNet-T step against 2.37 ms without the prefetch (168-190 registers); capped at 168 (3 programs per SM,
# spilling up to 28 bytes a thread), 1.83 ms (H200, session 15, call A).
CPE_BWD_PREFETCH = True
# The row walks' loops are not software-pipelined: with tl.range(num_stages=2, 3 or 4) Triton issues the next
# rows' loads early (cp.async into shared memory), at the same 168 registers, but the cpe backward took 3.60-3.67
# ms instead of 1.82 ms and the parameter gradients 2.00 instead of 0.90 ms (GPU time of a 1024² block step,
# C=64, B=2, bf16, H200; benchmarks/results/nvidia-h200/2026-11-28-session13, call B).
# The depthwise parameter-gradient kernel walks grid rows like the cpe backward: PARAM_GRAD_PROGRAMS_PER_SM
# programs per SM, counted over all channel blocks (PARTIAL_PROGRAMS in the interpreter), and
# PARAM_GRAD_MAXNREG, ptxas's register cap (None: ptxas's choice). Measured on an H200 (the kernel's GPU time
# in a MLLA-UNet-T training step, 224², batch 48, bf16; the old square-tile kernel: 2.48 ms): capped at 128
# registers, 4 per SM (one wave) 1.36 ms; uncapped, 2 per SM 1.45 ms, 4 per SM 1.66 ms, 8 per SM 2.10 ms.
PARAM_GRAD_PROGRAMS_PER_SM = 4
PARAM_GRAD_MAXNREG: int | None = 128
# The forward stencils (cpe + LayerNorm, dwconv + SiLU) and the transposed one of the backward walk rows like the
# backward kernels (_stencil_walk_kernel: three loads per output), each step issuing the next tile's loads first:
# STENCIL_WALK_PROGRAMS_PER_SM programs per SM over all channel blocks (PARTIAL_PROGRAMS in the interpreter) and
# STENCIL_WALK_MAXNREG, ptxas's register cap. Measured on an H200 (the three stencils' GPU time, bf16, in a
# MLLA-UNet-T training step, 224², batch 48 / in a 1024² block step, C=64, batch 2): the square tiles of TH x TW
# tokens that they replaced (nine gathered loads per output, bound by L1) 2.53 / 2.35 ms; 5 per SM capped at 96
# registers 2.23 / 2.20 ms; uncapped (112 registers) 3 per SM 2.32 / 2.96 ms, 4 per SM 2.20 / 2.43 ms; 8 per SM
# capped at 64 (spilling 30 bytes) 3.32 / 3.18 ms; 4 per SM without the prefetch 2.16 / 2.60 ms
# (benchmarks/results/nvidia-h200/2026-11-28-session17, call A).
STENCIL_WALK_PROGRAMS_PER_SM = 5
STENCIL_WALK_MAXNREG: int | None = 96
TAPS = 9
# _stencil_walk_kernel's KIND
KIND_CPE = tl.constexpr(0)
KIND_SILU = tl.constexpr(1)
KIND_TRANSPOSE = tl.constexpr(2)

__all__ = [
    "cpe_residual_norm",
    "cpe_residual_norm_bwd",
    "cpe_residual_norm_bwd_h",
    "cpe_residual_norm_fwd",
    "dwconv_silu",
    "dwconv_silu_bwd",
    "dwconv_silu_fwd",
]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _store_weight_partials(p_dw, i_p, s_part, o_c, m_c, a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """Write one program's (C, 9) weight-gradient partial (row i_p of a partials buffer with row stride
    s_part): tap k's sum over tokens of its accumulator a_k."""
    p_row = p_dw + i_p.to(tl.int64) * s_part + o_c * 9
    tl.store(p_row + 0, tl.sum(a0, 0), mask=m_c)
    tl.store(p_row + 1, tl.sum(a1, 0), mask=m_c)
    tl.store(p_row + 2, tl.sum(a2, 0), mask=m_c)
    tl.store(p_row + 3, tl.sum(a3, 0), mask=m_c)
    tl.store(p_row + 4, tl.sum(a4, 0), mask=m_c)
    tl.store(p_row + 5, tl.sum(a5, 0), mask=m_c)
    tl.store(p_row + 6, tl.sum(a6, 0), mask=m_c)
    tl.store(p_row + 7, tl.sum(a7, 0), mask=m_c)
    tl.store(p_row + 8, tl.sum(a8, 0), mask=m_c)


@triton.jit
def _normalize(b_r, m_c, inv_c, eps):
    """LayerNorm statistics over the channels of b_r [BLOCK_T, BLOCK_C] (inv_c = 1 / C): (xhat, rstd [BLOCK_T])."""
    b_mean = tl.sum(b_r, 1) * inv_c
    b_diff = tl.where(m_c[None, :], b_r - b_mean[:, None], 0.0)
    b_rstd = tl.rsqrt(tl.sum(b_diff * b_diff, 1) * inv_c + eps)
    return b_diff * b_rstd[:, None], b_rstd


@triton.jit
def _reduce_partials_kernel(
    part, n_rows, s_row, out0, out1, out2, out3, out4, end0, end1, end2, end3, end4, scale,
    BLOCK_R: tl.constexpr, BLOCK_COLS: tl.constexpr, STAGES: tl.constexpr,
):
    """Column sums of the fp32 partials (n_rows, end4), in a fixed order, written into up to five outputs:
    columns [0, end0) to out0, [end0, end1) to out1, [end1, end2) to out2, [end2, end3) to out3, [end3, end4)
    to out4 (each in its own dtype), times scale. One launch replaces a torch.sum per gradient, and the
    outputs are separate tensors."""
    o_j = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    m_j = o_j < end4
    acc = tl.zeros([BLOCK_R, BLOCK_COLS], dtype=tl.float32)
    for r0 in tl.range(0, n_rows, BLOCK_R, num_stages=STAGES):
        o_r = r0 + tl.arange(0, BLOCK_R)
        offs = o_r.to(tl.int64)[:, None] * s_row + o_j[None, :]
        acc += tl.load(part + offs, mask=(o_r < n_rows)[:, None] & m_j[None, :], other=0.0)
    total = tl.sum(acc, 0) * scale
    tl.store(out0 + o_j, total.to(out0.dtype.element_ty), mask=o_j < end0)
    tl.store(out1 + (o_j - end0), total.to(out1.dtype.element_ty), mask=(o_j >= end0) & (o_j < end1))
    tl.store(out2 + (o_j - end1), total.to(out2.dtype.element_ty), mask=(o_j >= end1) & (o_j < end2))
    tl.store(out3 + (o_j - end2), total.to(out3.dtype.element_ty), mask=(o_j >= end2) & (o_j < end3))
    tl.store(out4 + (o_j - end3), total.to(out4.dtype.element_ty), mask=(o_j >= end3) & m_j)


@triton.jit
def _tap_weights(p_w, o_c, m_c, RESIDUAL: tl.constexpr):
    """The nine 3x3 taps of the depthwise weight (C, 9), each [BLOCK_C] in fp32 (tap k = 3 * di + dj);
    RESIDUAL adds one to the centre tap (the stencil then adds x itself)."""
    w0 = tl.load(p_w + o_c * 9 + 0, mask=m_c, other=0.0).to(tl.float32)
    w1 = tl.load(p_w + o_c * 9 + 1, mask=m_c, other=0.0).to(tl.float32)
    w2 = tl.load(p_w + o_c * 9 + 2, mask=m_c, other=0.0).to(tl.float32)
    w3 = tl.load(p_w + o_c * 9 + 3, mask=m_c, other=0.0).to(tl.float32)
    w4 = tl.load(p_w + o_c * 9 + 4, mask=m_c, other=0.0).to(tl.float32)
    w5 = tl.load(p_w + o_c * 9 + 5, mask=m_c, other=0.0).to(tl.float32)
    w6 = tl.load(p_w + o_c * 9 + 6, mask=m_c, other=0.0).to(tl.float32)
    w7 = tl.load(p_w + o_c * 9 + 7, mask=m_c, other=0.0).to(tl.float32)
    w8 = tl.load(p_w + o_c * 9 + 8, mask=m_c, other=0.0).to(tl.float32)
    w4 += 1.0 * RESIDUAL
    return w0, w1, w2, w3, w4, w5, w6, w7, w8


@triton.jit
def _row_neighbours(p_x, stride_n, y, col, o_c, m_c, H, W):
    """x at grid row y and columns col - 1, col, col + 1 (one image; p_x points at its first token), in
    fp32, zero outside the grid: three [TW, BLOCK_C]. The row offset is int64, the column offsets int32."""
    b_l, b_m, b_r = _row_neighbours_raw(p_x, stride_n, y, col, o_c, m_c, H, W)
    return b_l.to(tl.float32), b_m.to(tl.float32), b_r.to(tl.float32)


@triton.jit
def _row_neighbours_raw(p_x, stride_n, y, col, o_c, m_c, H, W):
    """``_row_neighbours`` in x's own dtype (a prefetch holds them so: half the registers of fp32 for 16-bit x)."""
    p_row = p_x + (y * W).to(tl.int64) * stride_n
    y_t = tl.zeros_like(col) + y  # a tensor, not a scalar: the interpreter needs it
    m_y = (y_t >= 0) & (y_t < H)
    c_l, c_r = col - 1, col + 1
    m_l = (m_y & (c_l >= 0) & (c_l < W))[:, None] & m_c[None, :]
    m_m = (m_y & (col < W))[:, None] & m_c[None, :]
    m_r = (m_y & (c_r < W))[:, None] & m_c[None, :]
    b_l = tl.load(p_row + (c_l * stride_n)[:, None] + o_c[None, :], mask=m_l, other=0.0)
    b_m = tl.load(p_row + (col * stride_n)[:, None] + o_c[None, :], mask=m_m, other=0.0)
    b_r = tl.load(p_row + (c_r * stride_n)[:, None] + o_c[None, :], mask=m_r, other=0.0)
    return b_l, b_m, b_r


@triton.jit
def _run_bounds(i_p, n_p, n_rows):
    """Row tiles [start, end) of program i_p of n_p: contiguous runs, as equal as they can be."""
    start = (i_p.to(tl.int64) * n_rows // n_p).to(tl.int32)
    end = ((i_p + 1).to(tl.int64) * n_rows // n_p).to(tl.int32)
    return start, end


@triton.jit
def _strip_columns(i_s, n_tiles_w, TW: tl.constexpr):
    """The sample and the columns [TW] of strip i_s (strips numbered sample by sample, n_tiles_w per sample)."""
    i_b = i_s // n_tiles_w
    return i_b, (i_s - i_b * n_tiles_w) * TW + tl.arange(0, TW)


@triton.jit
def _run_start(start, n_tiles_w, H, TW: tl.constexpr):
    """Strip, row, sample and columns [TW] of a run's first tile, row tile number start."""
    i_s = start // H
    i_b, col = _strip_columns(i_s, n_tiles_w, TW)
    return i_s, start - i_s * H, i_b, col


@triton.jit
def _walk_refill(x, sx_b, sx_n, i_s, y, n_tiles_w, o_c, m_c, H, W, TW: tl.constexpr):
    """Enter strip i_s + y // H at row y % H (y == H: the next strip's top row): returns (strip, row, sample,
    the tile's columns [TW], x's rows y - 1 and y at column shifts -1, 0, +1 (six [TW, BLOCK_C]))."""
    i_s += y // H
    y = y % H
    i_b, col = _strip_columns(i_s, n_tiles_w, TW)
    p_x = x + i_b.to(tl.int64) * sx_b
    x_u0, x_u1, x_u2 = _row_neighbours(p_x, sx_n, y - 1, col, o_c, m_c, H, W)
    x_v0, x_v1, x_v2 = _row_neighbours(p_x, sx_n, y, col, o_c, m_c, H, W)
    return i_s, y, i_b, col, x_u0, x_u1, x_u2, x_v0, x_v1, x_v2


@triton.jit
def _next_tile(i, end, i_s, y, n_tiles_w, H, TW: tl.constexpr):
    """Row, sample and columns [TW] of a run's tile i + 1 after tile i at (strip i_s, row y < H): the next row,
    or the next strip's top row; tile i's own where i + 1 is past the run (a prefetch there reloads the current
    tile instead of reading past the tensor)."""
    y_n = y + (i + 1 < end).to(tl.int32)
    wrap = (y_n == H).to(tl.int32)
    i_s_n = i_s + wrap
    i_b_n, col_n = _strip_columns(i_s_n, n_tiles_w, TW)
    return y_n - wrap * H, i_b_n, col_n


@triton.jit
def _prefetch_row_below(x, sx_b, sx_n, i, end, i_s, y, n_tiles_w, o_c, m_c, H, W, TW: tl.constexpr):
    """A prefetching walk's loads for the run's tile i + 1 (``_next_tile``): x's row below it at column shifts
    -1, 0, +1 in x's own dtype, then that tile's row, sample and columns [TW]."""
    y_n, i_b_n, col_n = _next_tile(i, end, i_s, y, n_tiles_w, H, TW)
    n_d0, n_d1, n_d2 = _row_neighbours_raw(x + i_b_n.to(tl.int64) * sx_b, sx_n, y_n + 1, col_n, o_c, m_c, H, W)
    return n_d0, n_d1, n_d2, y_n, i_b_n, col_n


@triton.jit
def _tile_load(p, s_b, s_n, i_b, y, col, o_c, m_c, W, MASKED: tl.constexpr):
    """One row tile [TW, BLOCK_C] of a (B, N, C) tensor at sample i_b, grid row y, columns col, in its own
    dtype (zero past the grid's last column or C when MASKED)."""
    p_t = p + i_b.to(tl.int64) * s_b + (y * W).to(tl.int64) * s_n + (col * s_n)[:, None] + o_c[None, :]
    if MASKED:
        return tl.load(p_t, mask=(col < W)[:, None] & m_c[None, :], other=0.0)
    return tl.load(p_t)


@triton.jit
def _tile_store(p, b, m, MASKED: tl.constexpr):
    """Store the tile b at the pointers p in p's dtype, masked by m when MASKED."""
    if MASKED:
        tl.store(p, b.to(p.dtype.element_ty), mask=m)
    else:
        tl.store(p, b.to(p.dtype.element_ty))


@triton.jit
def _window_stencil(x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2, w0, w1, w2, w3, w4, w5, w6, w7, w8):
    """sum over the 3x3 taps of w[tap] * x[p + tap] from the window's nine tiles, in the order k = 3 * di + dj of
    every stencil here (so that a backward's recomputation rounds like the forward). [TW, BLOCK_C]"""
    b = tl.zeros_like(x_v1)
    b += x_u0 * w0[None, :]
    b += x_u1 * w1[None, :]
    b += x_u2 * w2[None, :]
    b += x_v0 * w3[None, :]
    b += x_v1 * w4[None, :]
    b += x_v2 * w5[None, :]
    b += x_d0 * w6[None, :]
    b += x_d1 * w7[None, :]
    b += x_d2 * w8[None, :]
    return b


@triton.jit
def _window_taps(a0, a1, a2, a3, a4, a5, a6, a7, a8, b_g,
                 x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2):
    """Add each 3x3 tap's g * shifted-x product, from the window's nine tiles, to its accumulator."""
    a0 += b_g * x_u0
    a1 += b_g * x_u1
    a2 += b_g * x_u2
    a3 += b_g * x_v0
    a4 += b_g * x_v1
    a5 += b_g * x_v2
    a6 += b_g * x_d0
    a7 += b_g * x_d1
    a8 += b_g * x_d2
    return a0, a1, a2, a3, a4, a5, a6, a7, a8


@triton.jit
def _cpe_residual_norm_bwd_kernel(
    x, cpe_w, cpe_b, dr, dh, norm_w, norm_b, g, h, dw_part, db_part, dgamma_part, dbeta_part, drbias_part, rscale,
    H, W, C, n_tiles_w, n_rows,
    sx_b, sx_n, sdr_b, sdr_n, sdh_b, sdh_n, sg_b, sg_n, eps, s_part,
    TW: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, EVEN_W: tl.constexpr,
    HAS_DR: tl.constexpr, HAS_DH: tl.constexpr, WRITE_H: tl.constexpr, RBIAS_GRAD: tl.constexpr,
    HAS_RSCALE: tl.constexpr, PREFETCH: tl.constexpr,
):
    """g = dr + LayerNorm backward of dh, stored; fp32 partials of the cpe and norm parameter gradients; with
    WRITE_H (and HAS_DH) also the forward's h = LayerNorm(r), from the recomputed r, into h (strided like g);
    with RBIAS_GRAD also the partials of dr's sum over tokens (the gradient of a bias added to r, the
    forward's HAS_RBIAS; zero without HAS_DR), into drbias_part; with HAS_RSCALE (the forward's too), dr
    scaled by rscale[sample] in that sum.

    A tile is TW tokens of one grid row (all C channels). The tiles are numbered strip by strip (a strip:
    one batch sample's TW-wide column block, top row to bottom row) and each program walks down a
    contiguous run of them, the runs of all programs as equal as they can be. x's 3x3 neighbourhood of
    row y (rows y - 1, y, y + 1, each at columns shifted by -1, 0, +1) stays in registers from one row to
    the next, so a step loads only row y + 1's three shifts; the nine tiles serve both the recomputation
    of r = x + dwconv(x) (the forward's own tap order and rounding, so the forward keeps only x for the
    backward) and the weight gradient dw[tap] = sum_p g[p] * x[p + tap]. The window is refilled where a
    run starts and where it enters a new strip.
    The parameter gradients are accumulated element-wise over the program's tiles and summed over
    tokens once at the end: a cross-warp reduction per tile would dominate the kernel's time. dr's sum has
    an accumulator of its own only with RBIAS_GRAD (one more [TW, BLOCK_C] tile of registers).
    PREFETCH: each step issues the next tile's loads (x's row below it, dh, dr; in their own dtypes) before its
    own arithmetic, so that they are in flight while this tile is computed.
    """
    i_p, n_p = tl.program_id(0), tl.num_programs(0)
    start, end = _run_bounds(i_p, n_p, n_rows)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < (BLOCK_C if EVEN_C else C)  # all true at compile time when C == BLOCK_C
    inv_c = 1.0 / C
    MASKED: tl.constexpr = not (EVEN_C and EVEN_W)  # some tiles reach past the grid's last column or C
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = _tap_weights(cpe_w, o_c, m_c, True)
    b_bias = tl.load(cpe_b + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_gamma = tl.load(norm_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    if WRITE_H:
        b_beta = tl.load(norm_b + o_c, mask=m_c, other=0.0).to(tl.float32)
    zero = tl.zeros([TW, BLOCK_C], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    a_db, a_dgamma, a_dbeta, a_drbias = zero, zero, zero, zero
    x_u0, x_u1, x_u2, x_v0, x_v1, x_v2 = zero, zero, zero, zero, zero, zero  # rows y - 1 and y
    i_s, y, i_b, col = _run_start(start, n_tiles_w, H, TW)
    if PREFETCH:  # the run's first tile
        n_d0, n_d1, n_d2 = _row_neighbours_raw(x + i_b.to(tl.int64) * sx_b, sx_n, y + 1, col, o_c, m_c, H, W)
        if HAS_DH:
            n_dh = _tile_load(dh, sdh_b, sdh_n, i_b, y, col, o_c, m_c, W, MASKED)
        if HAS_DR:
            n_dr = _tile_load(dr, sdr_b, sdr_n, i_b, y, col, o_c, m_c, W, MASKED)
    for i in range(start, end):
        if (i == start) | (y == H):  # a run's first tile, or the first of a new strip: refill the window
            i_s, y, i_b, col, x_u0, x_u1, x_u2, x_v0, x_v1, x_v2 = _walk_refill(
                x, sx_b, sx_n, i_s, y, n_tiles_w, o_c, m_c, H, W, TW)
        i_b64 = i_b.to(tl.int64)
        m_t = col < W
        m = m_t[:, None] & m_c[None, :]
        o_y = (y * W).to(tl.int64)
        if PREFETCH:
            x_d0, x_d1, x_d2 = n_d0.to(tl.float32), n_d1.to(tl.float32), n_d2.to(tl.float32)
            if HAS_DH:
                b_dh = n_dh.to(tl.float32)
            if HAS_DR:
                b_dr = n_dr.to(tl.float32)
            n_d0, n_d1, n_d2, y_n, i_b_n, col_n = _prefetch_row_below(x, sx_b, sx_n, i, end, i_s, y, n_tiles_w,
                                                                       o_c, m_c, H, W, TW)
            if HAS_DH:
                n_dh = _tile_load(dh, sdh_b, sdh_n, i_b_n, y_n, col_n, o_c, m_c, W, MASKED)
            if HAS_DR:
                n_dr = _tile_load(dr, sdr_b, sdr_n, i_b_n, y_n, col_n, o_c, m_c, W, MASKED)
        else:
            x_d0, x_d1, x_d2 = _row_neighbours(x + i_b64 * sx_b, sx_n, y + 1, col, o_c, m_c, H, W)
            if HAS_DH:
                b_dh = _tile_load(dh, sdh_b, sdh_n, i_b, y, col, o_c, m_c, W, MASKED).to(tl.float32)
            if HAS_DR:
                b_dr = _tile_load(dr, sdr_b, sdr_n, i_b, y, col, o_c, m_c, W, MASKED).to(tl.float32)

        b_g = zero
        if HAS_DH:
            b_r = _window_stencil(x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2,
                                  w0, w1, w2, w3, w4, w5, w6, w7, w8)
            b_r += b_bias[None, :]
            b_r = b_r.to(g.dtype.element_ty).to(tl.float32)
            if MASKED:
                b_r = tl.where(m, b_r, 0.0)
            b_xhat, b_rstd = _normalize(b_r, m_c, inv_c, eps)
            if WRITE_H:
                b_h = (b_xhat * b_gamma[None, :] + b_beta[None, :]).to(h.dtype.element_ty)
                p_h = h + i_b64 * sg_b + o_y * sg_n + (col * sg_n)[:, None] + o_c[None, :]
                if MASKED:
                    tl.store(p_h, b_h, mask=m)
                else:
                    tl.store(p_h, b_h)
            a_dgamma += b_dh * b_xhat
            a_dbeta += b_dh
            b_gdh = b_dh * b_gamma[None, :]
            b_mean_gdh = tl.sum(b_gdh, 1) * inv_c
            b_mean_gdh_xhat = tl.sum(b_gdh * b_xhat, 1) * inv_c
            b_g = b_rstd[:, None] * (b_gdh - b_mean_gdh[:, None] - b_xhat * b_mean_gdh_xhat[:, None])
            if MASKED:
                b_g = tl.where(m, b_g, 0.0)
        if HAS_DR:
            b_g += b_dr
            if RBIAS_GRAD:
                if HAS_RSCALE:
                    a_drbias += b_dr * tl.load(rscale + i_b)
                else:
                    a_drbias += b_dr
        p_g = g + i_b64 * sg_b + o_y * sg_n + (col * sg_n)[:, None] + o_c[None, :]
        if MASKED:
            tl.store(p_g, b_g.to(g.dtype.element_ty), mask=m)
        else:
            tl.store(p_g, b_g.to(g.dtype.element_ty))

        a_db += b_g
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window_taps(a0, a1, a2, a3, a4, a5, a6, a7, a8, b_g,
                                                          x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2)
        x_u0, x_u1, x_u2 = x_v0, x_v1, x_v2
        x_v0, x_v1, x_v2 = x_d0, x_d1, x_d2
        y += 1

    _store_weight_partials(dw_part, i_p, s_part, o_c, m_c, a0, a1, a2, a3, a4, a5, a6, a7, a8)
    tl.store(db_part + i_p.to(tl.int64) * s_part + o_c, tl.sum(a_db, 0), mask=m_c)
    tl.store(dgamma_part + i_p.to(tl.int64) * s_part + o_c, tl.sum(a_dgamma, 0), mask=m_c)
    tl.store(dbeta_part + i_p.to(tl.int64) * s_part + o_c, tl.sum(a_dbeta, 0), mask=m_c)
    if RBIAS_GRAD:
        tl.store(drbias_part + i_p.to(tl.int64) * s_part + o_c, tl.sum(a_drbias, 0), mask=m_c)


@triton.jit
def _stencil_walk_kernel(
    x, w, bias, rbias, rscale, norm_w, norm_b, out, out2,
    H, W, C, n_tiles_w, n_rows, sx_b, sx_n, so_b, so_n, eps,
    TW: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, EVEN_W: tl.constexpr, KIND: tl.constexpr,
    RESIDUAL: tl.constexpr, HAS_RBIAS: tl.constexpr, HAS_RSCALE: tl.constexpr,
):
    """A depthwise 3x3 stencil of x (zero padding) over channel block program_id(1), by KIND:

    * KIND_CPE: out = r = x + dwconv(x) + bias and out2 = LayerNorm(r) (norm_w, norm_b; the block holds all C
      channels); with HAS_RBIAS the stored r is r + rbias (rounded once) while out2 stays the LayerNorm of r
      without it, and with HAS_RSCALE r + rscale[sample] * rbias;
    * KIND_SILU: out = SiLU(dwconv(x) + bias);
    * KIND_TRANSPOSE: out = the transposed stencil of x, sum over taps of w[tap] * x[p - tap] (plus x itself
      with RESIDUAL): the input gradient of a convolution whose output gradient is x.

    The tiles walk like ``_cpe_residual_norm_bwd_kernel``'s: a tile is TW tokens of one grid row, numbered strip
    by strip, and each program walks a contiguous run of them with x's 3x3 neighbourhood in registers, so that a
    step loads only the row below at three column shifts: three loads per output instead of a gathered tile's
    nine. The taps are summed in the order k = 3 * di + dj, as the cpe backward recomputes r (so it rounds the
    same way). Each step issues the next tile's loads before its own arithmetic, so that they are in flight while
    this tile is computed.
    """
    i_p, i_c, n_p = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    start, end = _run_bounds(i_p, n_p, n_rows)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = (tl.arange(0, BLOCK_C) < BLOCK_C) if EVEN_C else (o_c < C)  # all true at compile time when EVEN_C
    MASKED: tl.constexpr = not (EVEN_C and EVEN_W)  # some tiles reach past the grid's last column or C
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = _tap_weights(w, o_c, m_c, RESIDUAL)
    if KIND != KIND_TRANSPOSE:
        b_bias = tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    if KIND == KIND_CPE:
        b_gamma = tl.load(norm_w + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_beta = tl.load(norm_b + o_c, mask=m_c, other=0.0).to(tl.float32)
        if HAS_RBIAS:
            b_rbias = tl.load(rbias + o_c, mask=m_c, other=0.0).to(tl.float32)
    zero = tl.zeros([TW, BLOCK_C], dtype=tl.float32)
    x_u0, x_u1, x_u2, x_v0, x_v1, x_v2 = zero, zero, zero, zero, zero, zero  # rows y - 1 and y
    i_s, y, i_b, col = _run_start(start, n_tiles_w, H, TW)
    n_d0, n_d1, n_d2 = _row_neighbours_raw(x + i_b.to(tl.int64) * sx_b, sx_n, y + 1, col, o_c, m_c, H, W)
    for i in range(start, end):
        if (i == start) | (y == H):  # a run's first tile, or the first of a new strip: refill the window
            i_s, y, i_b, col, x_u0, x_u1, x_u2, x_v0, x_v1, x_v2 = _walk_refill(
                x, sx_b, sx_n, i_s, y, n_tiles_w, o_c, m_c, H, W, TW)
        x_d0, x_d1, x_d2 = n_d0.to(tl.float32), n_d1.to(tl.float32), n_d2.to(tl.float32)
        n_d0, n_d1, n_d2, _, _, _ = _prefetch_row_below(x, sx_b, sx_n, i, end, i_s, y, n_tiles_w, o_c, m_c,
                                                        H, W, TW)
        if KIND == KIND_TRANSPOSE:  # the window mirrored: x[p - tap]
            b = _window_stencil(x_d2, x_d1, x_d0, x_v2, x_v1, x_v0, x_u2, x_u1, x_u0,
                                w0, w1, w2, w3, w4, w5, w6, w7, w8)
        else:
            b = _window_stencil(x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2,
                                w0, w1, w2, w3, w4, w5, w6, w7, w8)
            b += b_bias[None, :]
        o_t = i_b.to(tl.int64) * so_b + (y * W).to(tl.int64) * so_n + (col * so_n)[:, None] + o_c[None, :]
        m = (col < W)[:, None] & m_c[None, :]
        if KIND == KIND_CPE:
            if HAS_RBIAS:
                b_rb = b_rbias
                if HAS_RSCALE:
                    b_rb = b_rb * tl.load(rscale + i_b)
                _tile_store(out + o_t, b + b_rb[None, :], m, MASKED)
            # out2 is the LayerNorm of r rounded to r's dtype (as stored without rbias), which is also what the
            # backward recomputes it from
            b = b.to(out.dtype.element_ty)
            if not HAS_RBIAS:
                _tile_store(out + o_t, b, m, MASKED)
            b = b.to(tl.float32)
            if not EVEN_C:
                b = tl.where(m_c[None, :], b, 0.0)
            b_xhat, _ = _normalize(b, m_c, 1.0 / C, eps)
            _tile_store(out2 + o_t, b_xhat * b_gamma[None, :] + b_beta[None, :], m, MASKED)
        elif KIND == KIND_SILU:
            _tile_store(out + o_t, b * tl.sigmoid(b), m, MASKED)
        else:
            _tile_store(out + o_t, b, m, MASKED)
        x_u0, x_u1, x_u2 = x_v0, x_v1, x_v2
        x_v0, x_v1, x_v2 = x_d0, x_d1, x_d2
        y += 1


@triton.jit
def _dwconv_param_grad_kernel(
    x, w, bias, dy, g, dw_part, db_part,
    H, W, C, n_tiles_w, n_rows,
    sx_b, sx_n, sdy_b, sdy_n, sg_b, sg_n, s_part,
    TW: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, EVEN_W: tl.constexpr, SILU: tl.constexpr,
):
    """fp32 partials of the weight and bias gradients of a depthwise 3x3 convolution of x:
    dw[c, tap] = sum_p g[p, c] * x[p + tap, c] and db[c] = sum_p g[p, c], over channel block
    program_id(1) (BLOCK_C channels).

    SILU: the convolution feeds a SiLU and dy is the SiLU's output gradient: g = dy * SiLU'(pre), with
    pre recomputed, is stored for the transposed stencil. Otherwise dy is the convolution's output
    gradient itself (g = dy; nothing is stored).

    The tiles walk like ``_cpe_residual_norm_bwd_kernel``'s: a tile is TW tokens of one grid row, numbered
    strip by strip (one sample's TW-wide column block, top row to bottom row), and each program walks a
    contiguous run of them with x's 3x3 neighbourhood in registers, loading only row y + 1 at each step
    (the nine tiles serve both the recomputation of pre and the weight gradient); the window is refilled
    where a run starts and where it enters a new strip. The gradients are accumulated element-wise over
    the program's tiles and summed over tokens once at the end. (Prefetching the next tile, as the cpe backward
    does, was measured on an H200 and not taken: capped at 128 registers, 4 programs per SM, 1.385 against 1.348
    ms of a MLLA-UNet-T step; uncapped, 3 per SM, 1.253 against 1.359 ms there but 0.965 against 0.894 ms at
    1024²; benchmarks/results/nvidia-h200/2026-11-28-session15, calls A and D.)
    """
    i_p, i_c, n_p = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
    start, end = _run_bounds(i_p, n_p, n_rows)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = (tl.arange(0, BLOCK_C) < BLOCK_C) if EVEN_C else (o_c < C)  # all true at compile time when EVEN_C
    MASKED: tl.constexpr = not (EVEN_C and EVEN_W)  # some tiles reach past the grid's last column or C
    if SILU:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = _tap_weights(w, o_c, m_c, False)
        b_bias = tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    zero = tl.zeros([TW, BLOCK_C], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    a_db = zero
    x_u0, x_u1, x_u2, x_v0, x_v1, x_v2 = zero, zero, zero, zero, zero, zero  # rows y - 1 and y
    i_s, y, i_b, col = _run_start(start, n_tiles_w, H, TW)
    for i in range(start, end):
        if (i == start) | (y == H):  # a run's first tile, or the first of a new strip: refill the window
            i_s, y, i_b, col, x_u0, x_u1, x_u2, x_v0, x_v1, x_v2 = _walk_refill(
                x, sx_b, sx_n, i_s, y, n_tiles_w, o_c, m_c, H, W, TW)
        i_b64 = i_b.to(tl.int64)
        m_t = col < W
        m = m_t[:, None] & m_c[None, :]
        o_y = (y * W).to(tl.int64)
        x_d0, x_d1, x_d2 = _row_neighbours(x + i_b64 * sx_b, sx_n, y + 1, col, o_c, m_c, H, W)
        b_g = _tile_load(dy, sdy_b, sdy_n, i_b, y, col, o_c, m_c, W, MASKED).to(tl.float32)
        if SILU:
            b_pre = _window_stencil(x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2,
                                    w0, w1, w2, w3, w4, w5, w6, w7, w8)
            b_pre += b_bias[None, :]
            b_s = tl.sigmoid(b_pre)
            b_g = b_g * b_s * (1.0 + b_pre * (1.0 - b_s))  # zero past the grid's edge or C: dy loaded as zero
            p_g = g + i_b64 * sg_b + o_y * sg_n + (col * sg_n)[:, None] + o_c[None, :]
            if MASKED:
                tl.store(p_g, b_g.to(g.dtype.element_ty), mask=m)
            else:
                tl.store(p_g, b_g.to(g.dtype.element_ty))

        a_db += b_g
        a0, a1, a2, a3, a4, a5, a6, a7, a8 = _window_taps(a0, a1, a2, a3, a4, a5, a6, a7, a8, b_g,
                                                          x_u0, x_u1, x_u2, x_v0, x_v1, x_v2, x_d0, x_d1, x_d2)
        x_u0, x_u1, x_u2 = x_v0, x_v1, x_v2
        x_v0, x_v1, x_v2 = x_d0, x_d1, x_d2
        y += 1

    _store_weight_partials(dw_part, i_p, s_part, o_c, m_c, a0, a1, a2, a3, a4, a5, a6, a7, a8)
    tl.store(db_part + i_p.to(tl.int64) * s_part + o_c, tl.sum(a_db, 0), mask=m_c)


# ----------------------------------------------------------------------------------------------
# Launch geometry, checks and allocation
# ----------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and work buffer of this module is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _channel_block(C: int) -> int:
    """The widest of 128, 64, 32 channels that divides C."""
    return next(b for b in (128, 64, 32) if C % b == 0)


def _walk_num_warps(elements: int) -> int:
    """About 4 elements of a tile per thread for the row-walking kernels, whose window of nine tiles (and, in the
    backward ones, 12 or 13 fp32 accumulators: 9 taps, bias, norm weight and bias, a residual bias) lives in
    registers across the tile loop."""
    return max(1, min(16, elements // 128))


def _tokens_major(t: Tensor, walk_width: int) -> Tensor:
    """t itself when its channels are contiguous (any token and batch strides) and its offsets within a grid row
    of walk_width tokens fit in int32 (the row-walking kernels form a token's column offset col * token_stride
    in int32), else a contiguous copy."""
    if t.stride(-1) == 1 and walk_width * t.stride(1) < 2**31:
        return t
    return t.contiguous()


def _check_grid(hw: tuple[int, int]) -> tuple[int, int]:
    try:
        H, W = (int(s) for s in hw)
    except (TypeError, ValueError):
        raise ValueError(f"hw must be a pair of positive integers (H, W), got {hw!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"hw must be a pair of positive integers (H, W), got {hw!r}")
    return H, W


def _check_stencil_inputs(x: Tensor, hw: tuple[int, int], weight: Tensor, params: dict[str, Tensor],
                          max_channels: int | None = None) -> tuple[int, int]:
    """Validate tokens x (B, H*W, C), a (C, 1, 3, 3) depthwise weight and (C,) parameters; return (H, W)."""
    H, W = _check_grid(hw)
    check_tokens(x, (H, W))
    B, _, C = x.shape
    reason = fused_supported(x)
    if reason is not None:
        raise ValueError(f"x: {reason}")
    if B < 1:
        raise ValueError(f"x: expected a batch of at least one sample, got shape {tuple(x.shape)}")
    if C % CHANNEL_MULTIPLE:
        raise ValueError(f"x: expected a channel count that is a multiple of {CHANNEL_MULTIPLE}, got {C}")
    if max_channels is not None and max_channels < C:
        raise ValueError(f"x: expected at most {max_channels} channels, got {C}")
    named = {"weight": weight, **params}
    for name, p in named.items():
        if not isinstance(p, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got dtype {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got one on {p.device}")
        expected = (C, 1, 3, 3) if name == "weight" else (C,)
        if tuple(p.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected} for {C} channels, got {tuple(p.shape)}")
    return H, W


def check_sample_scale(scale: Tensor | None, x: Tensor, name: str, allowed: bool, needs: str) -> None:
    """Raise unless scale is None or a per-sample factor for x (B, ...): (B,) float32 on x's device, given only
    where allowed (needs names what must come with it)."""
    if scale is None:
        return
    if not allowed:
        raise ValueError(f"{name}: given without {needs}")
    if not isinstance(scale, Tensor) or tuple(scale.shape) != (x.shape[0],) or scale.dtype != torch.float32 \
            or scale.device != x.device:
        got = f"{scale.dtype} of shape {tuple(scale.shape)} on {scale.device}" if isinstance(scale, Tensor) \
            else type(scale).__name__
        raise ValueError(f"{name}: expected a float32 tensor of shape ({x.shape[0]},), one factor per sample, on "
                         f"{x.device}, got {got}")


def _check_like(name: str, t: Tensor | None, like: Tensor) -> None:
    """Raise unless t (skipped when None) is a floating-point tensor of like's shape on like's device."""
    if t is None:
        return
    if t.shape != like.shape or t.device != like.device or not t.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point tensor of shape {tuple(like.shape)} on {like.device}, "
            f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}"
        )


def _row_tiles(B: int, H: int, W: int, block_c: int) -> tuple[int, int, int]:
    """Row tiles of the row-walking kernels: (TW tokens per tile, tiles per grid row, row tiles in all)."""
    tw = min(max(1, TILE_ELEMENTS // block_c), triton.next_power_of_2(W))
    n_tiles_w = triton.cdiv(W, tw)
    return tw, n_tiles_w, B * n_tiles_w * H


def block_runs(n_blocks: int, target: int) -> tuple[int, int]:
    """Split n_blocks blocks (at least one) into contiguous runs of equal length for about target programs:
    (runs, blocks per run), at least one run and no run empty. Fixed for a shape and device, so the partial
    sums over the runs, and the results, are reproducible."""
    n_blocks = max(1, n_blocks)
    per_run = triton.cdiv(n_blocks, min(max(1, target), n_blocks))
    return triton.cdiv(n_blocks, per_run), per_run


def row_runs(n_rows: int, block_rows: int, device: torch.device, per_sm: int, interpreter_programs: int,
             n_cblocks: int = 1) -> tuple[int, int]:
    """(programs P, rows per program) of a launch whose programs each sum a fixed run of whole blocks of
    block_rows rows into one row of partials: about per_sm programs per SM over all n_cblocks column blocks on
    a GPU, interpreter_programs elsewhere (few, so that the tests make programs walk several blocks); no run
    empty (``block_runs``)."""
    if device.type == "cuda":
        target = per_sm * multiprocessors(device) // n_cblocks
    else:
        target = interpreter_programs
    n_progs, blocks_per_prog = block_runs(triton.cdiv(n_rows, block_rows), target)
    return n_progs, blocks_per_prog * block_rows


def rows(t: Tensor) -> Tensor:
    """t (..., C) as an (M, C) matrix with unit channel stride: a view where the leading dimensions allow, else
    a copy (also of a gradient with channel stride 0, as ``y.sum().backward()`` hands a backward)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.shape[-1] <= 1 or t2.stride(-1) == 1 else t2.contiguous()


def _row_walk_programs(n_rows: int, device: torch.device, per_sm: int, n_cblocks: int = 1) -> int:
    """Programs per channel block of a kernel whose programs walk runs of row tiles: per_sm per SM on a GPU,
    PARTIAL_PROGRAMS in the interpreter (so that the tests can make programs walk many rows), in all over the
    n_cblocks channel blocks; at least one and at most one per row tile."""
    if device.type == "cuda":
        target = per_sm * multiprocessors(device)
    else:
        target = PARTIAL_PROGRAMS
    return max(1, min(n_rows, target // n_cblocks))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# reduce_partials' programs sum REDUCE_COLS columns each, REDUCE_ROWS rows per step. Under Triton's interpreter,
# whose cost is per program, they take INTERPRETER_REDUCE_COLS columns: a state or weight gradient of tens of
# thousands of columns would otherwise be a thousand programs, minutes of CPU time per training step.
REDUCE_ROWS, REDUCE_COLS = 64, 32
INTERPRETER_REDUCE_COLS = 1024
# Its row loop is software-pipelined (tl.range(num_stages=REDUCE_STAGES)): the next row blocks' loads are in
# flight (cp.async) while the current one is summed. The 273 reductions of a MLLA-UNet-T training step (224²,
# batch 48, bf16, H200) took 1.30 ms at 3 stages, 1.49 ms without (session 13, call B); 1 turns it off.
REDUCE_STAGES = 3


def reduce_partials(part: Tensor, outputs: list[tuple[tuple[int, ...], torch.dtype]],
                    scale: float = 1.0) -> list[Tensor]:
    """Sum the fp32 partials part (rows, columns) over rows, times scale, into new tensors of the given
    shapes and dtypes, which take the columns in order (their sizes add up to the columns): one kernel
    launch, a fixed summation order (deterministic), and results that share no memory (a custom op may
    not return aliases). Up to five outputs."""
    sizes = [math.prod(shape) for shape, _ in outputs]
    if not 1 <= len(outputs) <= 5 or sum(sizes) != part.shape[1] or part.stride(1) != 1:
        raise ValueError(f"reduce_partials: {len(outputs)} outputs of sizes {sizes} for partials of shape "
                         f"{tuple(part.shape)} with strides {part.stride()}")
    tensors = [_empty(shape, dtype, part.device) for shape, dtype in outputs]
    ends = list(itertools.accumulate(sizes))
    args = tensors + [tensors[-1]] * (5 - len(tensors))
    ends = ends + [ends[-1]] * (5 - len(ends))
    block_cols = REDUCE_COLS if part.is_cuda else INTERPRETER_REDUCE_COLS
    _reduce_partials_kernel[(triton.cdiv(part.shape[1], block_cols),)](
        part, part.shape[0], part.stride(0), *args, *ends, float(scale),
        BLOCK_R=REDUCE_ROWS, BLOCK_COLS=block_cols, STAGES=REDUCE_STAGES, num_warps=4,
    )
    return tensors


def cpe_residual_norm_fwd(x: Tensor, cpe_weight: Tensor, cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                          hw: tuple[int, int], eps: float = 1e-5,
                          residual_bias: Tensor | None = None,
                          residual_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Launch the forward of ``cpe_residual_norm``: x (B, N, C) -> r, h, both (B, N, C) contiguous in x's dtype.

    With residual_bias (C,), the r returned is ``r + residual_bias`` (rounded once to x's dtype) while h is
    still the LayerNorm of r, bitwise as without it: a bias that the consumer of r would otherwise add (its
    gradient: ``cpe_residual_norm_bwd_h``'s residual_bias_grad). With residual_scale (B,) fp32 as well, sample
    b's r is ``r + residual_scale[b] * residual_bias``: the bias of a branch that drop-path scales per sample.
    """
    params = {"cpe_bias": cpe_bias, "norm_weight": norm_weight, "norm_bias": norm_bias}
    if residual_bias is not None:
        params["residual_bias"] = residual_bias
    H, W = _check_stencil_inputs(x, hw, cpe_weight, params, MAX_NORM_CHANNELS)
    check_sample_scale(residual_scale, x, "residual_scale", residual_bias is not None, "residual_bias")
    x = _tokens_major(x, W)
    r = _empty(x.shape, x.dtype, x.device)
    h = _empty(x.shape, x.dtype, x.device)
    _stencil(KIND_CPE, x, cpe_weight, (H, W), r, triton.next_power_of_2(x.shape[-1]), bias=cpe_bias, out2=h,
                  norm=(norm_weight, norm_bias, eps), rbias=residual_bias, rscale=residual_scale)
    return r, h


def _stencil(kind: int, x: Tensor, weight: Tensor, hw: tuple[int, int], out: Tensor, block_c: int,
             bias: Tensor | None = None, residual: bool = False, out2: Tensor | None = None,
             norm: tuple[Tensor, Tensor, float] | None = None, rbias: Tensor | None = None,
             rscale: Tensor | None = None) -> None:
    """The stencil of the given KIND (``_stencil_walk_kernel``'s) of x (B, N, C), channels contiguous and token
    offsets within a grid row in int32 (``_tokens_major(x, W)``), into out (and out2) (B, N, C), channels
    contiguous, both with the same token and batch strides. residual adds x itself (the centre tap plus one; always
    so for KIND_CPE)."""
    H, W = hw
    B, _, C = x.shape
    w = weight.contiguous()
    n_cblocks = triton.cdiv(C, block_c)
    tw, n_tiles_w, n_rows = _row_tiles(B, H, W, block_c)
    n_progs = _row_walk_programs(n_rows, x.device, STENCIL_WALK_PROGRAMS_PER_SM, n_cblocks)
    norm_w, norm_b, eps = (x, x, 0.0) if norm is None else (norm[0].contiguous(), norm[1].contiguous(), norm[2])
    _stencil_walk_kernel[(n_progs, n_cblocks)](
        x, w, x if bias is None else bias.contiguous(), x if rbias is None else rbias.contiguous(),
        x if rscale is None else rscale, norm_w, norm_b, out, out if out2 is None else out2,
        H, W, C, n_tiles_w, n_rows, x.stride(0), x.stride(1), out.stride(0), out.stride(1), eps,
        TW=tw, BLOCK_C=block_c, EVEN_C=C % block_c == 0, EVEN_W=W % tw == 0, KIND=kind,
        RESIDUAL=kind == KIND_CPE or residual,
        HAS_RBIAS=rbias is not None, HAS_RSCALE=rscale is not None,
        num_warps=_walk_num_warps(tw * block_c), maxnreg=STENCIL_WALK_MAXNREG,
    )


def _dwconv_transpose(g: Tensor, weight: Tensor, hw: tuple[int, int], residual: bool,
                      out: Tensor | None = None) -> Tensor:
    """dx (B, N, C) = transposed depthwise stencil of the contiguous g (B, N, C), plus g when residual; into out
    (channels contiguous, any token and batch strides) when given."""
    dx = _empty(g.shape, g.dtype, g.device) if out is None else out
    _stencil(KIND_TRANSPOSE, g, weight, hw, dx, _channel_block(g.shape[-1]), residual=residual)
    return dx


def cpe_residual_norm_bwd(dr: Tensor | None, dh: Tensor | None, x: Tensor, cpe_weight: Tensor,
                          cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, hw: tuple[int, int],
                          eps: float = 1e-5) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward of ``cpe_residual_norm``.

    dr, dh: (B, N, C) gradients of r and h (None for zero); x: the forward input (r is recomputed).
    Returns (dx (B, N, C) in x's dtype, d cpe_weight (C, 1, 3, 3), d cpe_bias, d norm_weight, d norm_bias (C,)),
    each parameter gradient in its parameter's dtype.
    """
    return cpe_residual_norm_bwd_h(dr, dh, x, cpe_weight, cpe_bias, norm_weight, norm_bias, hw, eps)[:5]


def cpe_residual_norm_bwd_h(dr: Tensor | None, dh: Tensor | None, x: Tensor, cpe_weight: Tensor,
                            cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, hw: tuple[int, int],
                            eps: float = 1e-5, write_h: bool = False, residual_bias_grad: bool = False,
                            residual_bias_dtype: torch.dtype = torch.float32,
                            residual_scale: Tensor | None = None) -> tuple[Tensor, ...]:
    """``cpe_residual_norm_bwd``'s five results, then two that are None unless asked for:

    * with write_h (and dh given), the forward's h (B, N, C) in x's dtype, written by the same kernel from the
      r it recomputes: for a consumer of h that keeps only x, such as ``mlla_fast.norm_linear``'s GEMM, whose
      weight gradient needs h;
    * with residual_bias_grad, the gradient (C,) in residual_bias_dtype of ``cpe_residual_norm_fwd``'s
      residual_bias, dr summed over tokens (zero when dr is None): from the same kernel and the same
      partials reduction, no pass over dr of its own; with the forward's residual_scale (B,), sample b's dr
      scaled by residual_scale[b] in that sum.
    """
    H, W = _check_stencil_inputs(x, hw, cpe_weight, {"cpe_bias": cpe_bias, "norm_weight": norm_weight,
                                                     "norm_bias": norm_bias}, MAX_NORM_CHANNELS)
    check_sample_scale(residual_scale, x, "residual_scale", residual_bias_grad, "residual_bias_grad")
    for name, t in (("dr", dr), ("dh", dh)):
        _check_like(name, t, x)
    x = _tokens_major(x, W)
    dr = None if dr is None else _tokens_major(dr, W)
    dh = None if dh is None else _tokens_major(dh, W)
    B, N, C = x.shape
    weight = cpe_weight.contiguous()

    block_c = triton.next_power_of_2(C)
    tw, n_tiles_w, n_rows = _row_tiles(B, H, W, block_c)
    n_progs = _row_walk_programs(n_rows, x.device, CPE_BWD_PROGRAMS_PER_SM)
    g = _empty((B, N, C), x.dtype, x.device)
    write_h = write_h and dh is not None
    h = _empty((B, N, C), x.dtype, x.device) if write_h else None
    n_vectors = 4 if residual_bias_grad else 3  # the cpe bias's, the norm's two and residual_bias's
    part = _empty((n_progs, (TAPS + n_vectors) * C), torch.float32, x.device)
    parts = part.split([TAPS * C] + [C] * n_vectors, dim=1)
    dw_part, db_part, dgamma_part, dbeta_part = parts[:4]
    drbias_part = parts[4] if residual_bias_grad else dbeta_part  # not written without RBIAS_GRAD
    dr_arg = x if dr is None else dr
    dh_arg = x if dh is None else dh
    _cpe_residual_norm_bwd_kernel[(n_progs,)](
        x, weight, cpe_bias.contiguous(), dr_arg, dh_arg, norm_weight.contiguous(), norm_bias.contiguous(), g,
        g if h is None else h, dw_part, db_part,
        dgamma_part, dbeta_part, drbias_part, x if residual_scale is None else residual_scale, H, W, C, n_tiles_w,
        n_rows,
        x.stride(0), x.stride(1), dr_arg.stride(0), dr_arg.stride(1),
        dh_arg.stride(0), dh_arg.stride(1), N * C, C, eps, part.stride(0),
        TW=tw, BLOCK_C=block_c, EVEN_C=block_c == C, EVEN_W=W % tw == 0, HAS_DR=dr is not None,
        HAS_DH=dh is not None, WRITE_H=write_h, RBIAS_GRAD=residual_bias_grad, HAS_RSCALE=residual_scale is not None,
        PREFETCH=CPE_BWD_PREFETCH, num_warps=_walk_num_warps(tw * block_c), maxnreg=CPE_BWD_MAXNREG,
    )
    dx = _dwconv_transpose(g, weight, (H, W), residual=True)
    outputs = [((C, 1, 3, 3), cpe_weight.dtype), ((C,), cpe_bias.dtype), ((C,), norm_weight.dtype),
               ((C,), norm_bias.dtype)]
    if residual_bias_grad:
        outputs.append(((C,), residual_bias_dtype))
    grads = reduce_partials(part, outputs)
    return dx, *grads[:4], h, grads[4] if residual_bias_grad else None


def dwconv_silu_fwd(x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int]) -> Tensor:
    """Launch the forward of ``dwconv_silu``: x (B, N, C) -> (B, N, C) contiguous in x's dtype."""
    H, W = _check_stencil_inputs(x, hw, weight, {"bias": bias})
    x = _tokens_major(x, W)
    y = _empty(x.shape, x.dtype, x.device)
    _stencil(KIND_SILU, x, weight, (H, W), y, _channel_block(x.shape[-1]), bias=bias)
    return y


def _param_grads(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int],
                 silu: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """Launch ``_dwconv_param_grad_kernel`` on token-major dy and x (B, N, C): returns (g or None, the fp32
    weight gradient (C, 9), the fp32 bias gradient (C,))."""
    H, W = hw
    B, N, C = x.shape
    block_c = _channel_block(C)
    n_cblocks = C // block_c
    tw, n_tiles_w, n_rows = _row_tiles(B, H, W, block_c)
    n_progs = _row_walk_programs(n_rows, x.device, PARAM_GRAD_PROGRAMS_PER_SM, n_cblocks)
    g = _empty((B, N, C), x.dtype, x.device) if silu else None
    part = _empty((n_progs, (TAPS + 1) * C), torch.float32, x.device)
    dw_part, db_part = part.split([TAPS * C, C], dim=1)
    _dwconv_param_grad_kernel[(n_progs, n_cblocks)](
        x, weight, bias, dy, dy if g is None else g, dw_part, db_part,
        H, W, C, n_tiles_w, n_rows,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), N * C, C, part.stride(0),
        TW=tw, BLOCK_C=block_c, EVEN_C=C % block_c == 0, EVEN_W=W % tw == 0, SILU=silu,
        num_warps=_walk_num_warps(tw * block_c), maxnreg=PARAM_GRAD_MAXNREG,
    )
    dw, db = reduce_partials(part, [((C, TAPS), torch.float32), ((C,), torch.float32)])
    return g, dw, db


def dwconv_silu_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int],
                    out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward of ``dwconv_silu``.

    dy: (B, N, C) gradient of the output; x: the forward input. Returns (dx (B, N, C) in x's dtype,
    d weight (C, 1, 3, 3), d bias (C,)), each parameter gradient in its parameter's dtype. With out (B, N, C)
    in x's dtype, channels contiguous, dx is written into it; out may be dy itself (dy is read only by the
    first kernel, dx written by the second).
    """
    H, W = _check_stencil_inputs(x, hw, weight, {"bias": bias})
    _check_like("dy", dy, x)
    x, dy = _tokens_major(x, W), _tokens_major(dy, W)
    C = x.shape[-1]
    weight_c = weight.contiguous()
    g, dw, db = _param_grads(dy, x, weight_c, bias.contiguous(), (H, W), silu=True)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"out: expected shape {tuple(x.shape)} in {x.dtype} with contiguous channels, got shape "
                         f"{tuple(out.shape)} in {out.dtype} with strides {out.stride()}")
    dx = _dwconv_transpose(g, weight_c, (H, W), residual=False, out=out)
    return dx, dw.view(C, 1, 3, 3).to(weight.dtype), db.to(bias.dtype)


def depthwise_param_grads(g: Tensor, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Weight and bias gradients (C, 9) and (C,), fp32, of a depthwise 3x3 convolution (zero padding 1) of
    the tokens x (B, N, C) whose output gradient is g (B, N, C): ``dw[c, tap] = sum_p g[p, c] x[p + tap, c]``,
    ``db[c] = sum_p g[p, c]``. Channels of x and g must be contiguous (token and batch strides free)."""
    C, W = x.shape[-1], hw[1]
    x = _tokens_major(x, W)
    _, dw, db = _param_grads(_tokens_major(g, W), x, x, x, hw, silu=False)  # weight, bias: unused without SiLU
    return dw.view(C, TAPS), db


# ----------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and their autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mlla_fast::cpe_residual_norm_fwd", mutates_args=(),
    schema="(Tensor x, Tensor cpe_weight, Tensor cpe_bias, Tensor norm_weight, Tensor norm_bias, "
           "SymInt H, SymInt W, float eps) -> (Tensor, Tensor)",
)
def _cpe_residual_norm_fwd_op(x, cpe_weight, cpe_bias, norm_weight, norm_bias, H, W, eps):
    return cpe_residual_norm_fwd(x, cpe_weight, cpe_bias, norm_weight, norm_bias, (H, W), eps)


@_cpe_residual_norm_fwd_op.register_fake
def _(x, cpe_weight, cpe_bias, norm_weight, norm_bias, H, W, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op(
    "mlla_fast::cpe_residual_norm_bwd", mutates_args=(),
    schema="(Tensor? dr, Tensor? dh, Tensor x, Tensor cpe_weight, Tensor cpe_bias, Tensor norm_weight, "
           "Tensor norm_bias, SymInt H, SymInt W, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _cpe_residual_norm_bwd_op(dr, dh, x, cpe_weight, cpe_bias, norm_weight, norm_bias, H, W, eps):
    return cpe_residual_norm_bwd(dr, dh, x, cpe_weight, cpe_bias, norm_weight, norm_bias, (H, W), eps)


@_cpe_residual_norm_bwd_op.register_fake
def _(dr, dh, x, cpe_weight, cpe_bias, norm_weight, norm_bias, H, W, eps):
    return (x.new_empty(x.shape), torch.empty_like(cpe_weight), torch.empty_like(cpe_bias),
            torch.empty_like(norm_weight), torch.empty_like(norm_bias))


def _cpe_residual_norm_setup_context(ctx, inputs, output):
    x, cpe_weight, cpe_bias, norm_weight, norm_bias, H, W, eps = inputs
    ctx.save_for_backward(x, cpe_weight, cpe_bias, norm_weight, norm_bias)
    ctx.grid, ctx.eps = (H, W), eps


def _cpe_residual_norm_backward(ctx, dr, dh):
    x, cpe_weight, cpe_bias, norm_weight, norm_bias = ctx.saved_tensors
    grads = torch.ops.mlla_fast.cpe_residual_norm_bwd(
        dr, dh, x, cpe_weight, cpe_bias, norm_weight, norm_bias, *ctx.grid, ctx.eps
    )
    return (*grads, None, None, None)


_cpe_residual_norm_fwd_op.register_autograd(
    _cpe_residual_norm_backward, setup_context=_cpe_residual_norm_setup_context
)


@torch.library.custom_op(
    "mlla_fast::dwconv_silu_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, SymInt H, SymInt W) -> Tensor",
)
def _dwconv_silu_fwd_op(x, weight, bias, H, W):
    return dwconv_silu_fwd(x, weight, bias, (H, W))


@_dwconv_silu_fwd_op.register_fake
def _(x, weight, bias, H, W):
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "mlla_fast::dwconv_silu_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor bias, SymInt H, SymInt W) -> (Tensor, Tensor, Tensor)",
)
def _dwconv_silu_bwd_op(dy, x, weight, bias, H, W):
    return dwconv_silu_bwd(dy, x, weight, bias, (H, W))


@_dwconv_silu_bwd_op.register_fake
def _(dy, x, weight, bias, H, W):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


def _dwconv_silu_setup_context(ctx, inputs, output):
    x, weight, bias, H, W = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.grid = (H, W)


def _dwconv_silu_backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    return (*torch.ops.mlla_fast.dwconv_silu_bwd(dy, x, weight, bias, *ctx.grid), None, None)


_dwconv_silu_fwd_op.register_autograd(_dwconv_silu_backward, setup_context=_dwconv_silu_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions (arguments mirror reference/ops.py)
# ----------------------------------------------------------------------------------------------


def cpe_residual_norm(x: Tensor, cpe_weight: Tensor, cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                      hw: tuple[int, int], eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Conditional positional encoding, residual and LayerNorm, fused: ``r = x + dwconv3x3(x)``, ``h = LN(r)``.

    Args:
        x: (B, N, C) tokens on the grid hw (N = H * W, row-major), float32/bfloat16/float16, C a
            multiple of 32 (at most 4096); channels contiguous, token and batch strides free.
        cpe_weight, cpe_bias: (C, 1, 3, 3) and (C,) depthwise convolution (zero padding 1).
        norm_weight, norm_bias: (C,) LayerNorm affine parameters.
        hw: the grid (H, W).
        eps: LayerNorm epsilon.

    Returns:
        (r, h), both (B, N, C) contiguous in x's dtype. Differentiable in x and all four parameters;
        parameter gradients come back in each parameter's dtype.
    """
    H, W = _check_stencil_inputs(x, hw, cpe_weight, {"cpe_bias": cpe_bias, "norm_weight": norm_weight,
                                                     "norm_bias": norm_bias}, MAX_NORM_CHANNELS)
    return torch.ops.mlla_fast.cpe_residual_norm_fwd(x, cpe_weight, cpe_bias, norm_weight, norm_bias, H, W,
                                                     float(eps))


def dwconv_silu(x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int]) -> Tensor:
    """SiLU of a depthwise 3x3 convolution (zero padding 1, with bias) of tokens, fused.

    Args:
        x: (B, N, C) tokens on the grid hw (N = H * W, row-major), float32/bfloat16/float16, C a
            multiple of 32; channels contiguous, token and batch strides free (e.g. a column slice
            of a wider projection output).
        weight, bias: (C, 1, 3, 3) and (C,) depthwise convolution parameters.
        hw: the grid (H, W).

    Returns:
        (B, N, C) contiguous in x's dtype. Differentiable in x, weight and bias; parameter
        gradients come back in each parameter's dtype.
    """
    H, W = _check_stencil_inputs(x, hw, weight, {"bias": bias})
    return torch.ops.mlla_fast.dwconv_silu_fwd(x, weight, bias, H, W)
