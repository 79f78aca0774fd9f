"""BatchNorm over the channels of a token matrix, forward and backward in Triton.

``nn.BatchNorm2d`` on token-major activations (B, N, C) is ``F.batch_norm`` on the (M = B*N, C) matrix:
per-channel statistics over all M rows. PyTorch's channels-last kernels for it ran far below the memory
bandwidth on an H200 (1.77 ms for the 11 BatchNorms of a MLLA-UNet-T training step at 224², batch 48, bf16).
Here, with fp32 arithmetic throughout:

- statistics (training): ``_bn_stats_kernel`` splits the rows into P fixed runs of whole row blocks, one
  program per (run, channel block). Each lane of its [BLOCK_M, BLOCK_C] tile keeps a Welford mean and sum of
  squared deviations (M2) over the rows it sees; at the end the lanes are merged into the run's (mean, M2) in
  two sums of non-negative or same-sign terms (mean = sum n_i mean_i / n, M2 = sum M2_i + n_i (mean_i - mean)^2)
  and written as one row of fp32 partials (P, 2C). ``_bn_combine_kernel`` merges the P runs the same way, in a
  fixed order. Why not sum and sum of squares: E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std
  (a channel at 1000 +- 1 keeps about one significant bit of its variance in fp32), and a shift by a sample
  value only helps as far as that sample is typical of its channel; Welford within lanes and Chan's merge
  between them never subtract two large sums, at a few extra FLOPs per element on a memory-bound pass. The
  kernels still accumulate x - x[0] (row 0 of each channel, exact for x within a factor 2 of it): the running
  means then stay near the channel's spread instead of its offset, so their updates round at the spread's
  scale, and the mean is rounded to fp32 once, when x[0] is added back.
- apply: ``_bn_apply_kernel``, one program per [BLOCK_M, BLOCK_C] tile, y = (x - mean) * rstd * w + b, with the
  batch statistics or the running ones (x - mean first, so a large common offset cancels exactly).
- backward: ``_bn_bwd_reduce_kernel`` writes fp32 partials (P, 2C) of sum dy and sum dy * xhat, summed by
  ``dwconv.reduce_partials`` (fixed order, no atomics: deterministic); in eval mode (running statistics, which
  do not depend on x) it also writes dx = dy * w * rstd in the same pass. In training mode
  ``_bn_bwd_elemt_kernel`` then writes dx = w rstd (dy - sum dy / M - xhat sum(dy xhat) / M).
- ReLU (``relu=True``, the stem's conv -> BatchNorm -> ReLU layers): the apply kernel writes max(y, 0), and the
  backward kernels take dy * [y > 0] for dy everywhere above (in the sums, so the weight and bias gradients,
  and in dx), with y recomputed from x, the statistics and the parameters: no mask and no output is kept for
  the backward, and PyTorch's separate ReLU forward and backward passes over the activation are gone.

The ops are ``mlla_fast::batch_norm_stats``, ``batch_norm_apply`` and ``batch_norm_bwd`` (torch custom ops with
fake implementations, so ``torch.compile`` traces around them), tied together by ``BatchNormTokensFunction``.
The running-statistics update is a few (C,)-sized PyTorch ops in the caller (``kernels/sampling.py``), on the
batch mean and biased variance that ``batch_norm_stats`` returns.

Output dtype: the input's. ``batch_norm`` is in none of autocast's cast lists (on CUDA ``layer_norm`` and
``group_norm`` run in fp32 under autocast, ``batch_norm`` does not; on the CPU it is not listed either), and
PyTorch's kernels return the input's dtype for a bf16/fp16 input with fp32 parameters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .dwconv import reduce_partials, row_runs, rows
from .lowp import cast

# Elements of one [BLOCK_M, BLOCK_C] tile, and the widest channel block (256 fp32 = 1 KiB of a row; the U-Net's
# BatchNorms have 64..512 channels, so a row is one or two blocks). 4096 elements with 8 warps: 16 per thread,
# next to the two tile-sized fp32 accumulators (Welford mean and M2, or sum dy and sum dy xhat) of the
# reducing kernels. As the LayerNorm and column-sum kernels; not swept on a GPU for this op.
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 256
NUM_WARPS = 8
# Programs per SM of the reducing launches, over all channel blocks: enough rows in flight to cover the DRAM
# latency, few enough partial rows that the merge over them is short. Under Triton's interpreter, whose cost is
# per program, INTERPRETER_PROGRAMS, few, so that the tests make programs walk several row blocks.
PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 3
# The merge kernel: one program per COMBINE_BLOCK_C channels (2 to 16 programs for 64..512 channels, rather than
# one or two), each summing [COMBINE_ROWS, COMBINE_BLOCK_C] tiles of partials, 16 fp32 per thread in 4 warps
# (with 256 channels per program, 64 rows spilled in an offline sm_90 compile).
COMBINE_ROWS = 64
COMBINE_BLOCK_C = 32

__all__ = ["BatchNormTokensFunction", "batch_norm_apply", "batch_norm_bwd", "batch_norm_stats"]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bn_params(mean, var, w, b, o_c, m_c, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(mean, rstd, rstd * w, b) of the channels o_c in fp32, [BLOCK_C] each (w = 1 without HAS_W, b = 0 without
    HAS_B)."""
    b_mean = tl.load(mean + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.load(var + o_c, mask=m_c, other=0.0).to(tl.float32) + eps)
    b_scale = b_rstd
    if HAS_W:
        b_scale = b_rstd * tl.load(w + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_shift = tl.zeros_like(b_rstd)
    if HAS_B:
        b_shift = tl.load(b + o_c, mask=m_c, other=0.0).to(tl.float32)
    return b_mean, b_rstd, b_scale, b_shift


@triton.jit
def _bn_out(b_x, b_mean, b_scale, b_shift):
    """y = (x - mean) * rstd * w + b in fp32 on a [BLOCK_M, BLOCK_C] tile of x: the apply kernel's output before
    rounding, and the backward's recomputation of it for the ReLU's mask (the same operations on the same fp32
    values, so the same y; were a compiler to contract them into an FMA in one kernel and not in the other, y
    would move by one rounding, which can flip the mask only of a y within a rounding of 0)."""
    return (b_x - b_mean[None, :]) * b_scale[None, :] + b_shift[None, :]


@triton.jit
def _relu_grad(b_g, b_x, b_mean, b_scale, b_shift, RELU: tl.constexpr):
    """The BatchNorm's output gradient on a tile: dy, or with RELU dy * [y > 0] (y by ``_bn_out``).

    The reference (BatchNorm, then ReLU on its output) rounds y to the output dtype before the ReLU, and PyTorch's
    ReLU backward masks by that rounded output > 0. Rounding is monotone and keeps the sign, so the two masks differ
    only where 0 < y underflows to 0 in the output dtype (fp16: y <= 2^-25; bf16: y <= 2^-134; never in fp32):
    there this mask passes dy where PyTorch's drops it, for an output that is 0 to its dtype's precision and a
    y that is vanishingly rare in an activation. Lanes off the tile's mask (x = dy = 0) stay 0."""
    if RELU:
        b_g = tl.where(_bn_out(b_x, b_mean, b_scale, b_shift) > 0.0, b_g, 0.0)
    return b_g


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _bn_stats_kernel(x, part, M, C, s_x, s_part, rows_per_prog, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[p] = [mean of x - x[0] (C) | M2 (C)] over the rows [p * rows_per_prog, (p + 1) * rows_per_prog) of
    run p, for the channels of this program's block (rows_per_prog a multiple of BLOCK_M, no run empty)."""
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    b_k = tl.load(x + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BC] the shift: row 0
    a_mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    a_m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    a_n = tl.zeros([BLOCK_M], dtype=tl.float32)  # rows seen by each lane row
    row_start = i_p * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        o_m = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
        m_m = o_m < row_end
        m = m_m[:, None] & m_c[None, :]  # [BM, BC]
        b_x = tl.load(x + o_m[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32) - b_k[None, :]
        a_n += m_m.to(tl.float32)
        b_inv = tl.where(m_m, 1.0 / tl.maximum(a_n, 1.0), 0.0)  # a lane past row_end keeps its state
        b_d = b_x - a_mean
        a_mean += b_d * b_inv[:, None]
        a_m2 += tl.where(m, b_d * (b_x - a_mean), 0.0)
    n = tl.sum(a_n, axis=0)
    b_mean = tl.sum(a_mean * a_n[:, None], axis=0) / n  # [BC]
    b_dev = a_mean - b_mean[None, :]
    b_m2 = tl.sum(a_m2 + a_n[:, None] * b_dev * b_dev, axis=0)
    p_part = part + i_p.to(tl.int64) * s_part + o_c
    tl.store(p_part, b_mean, mask=m_c)
    tl.store(p_part + C, b_m2, mask=m_c)


@triton.jit(do_not_specialize=["M", "rows_per_prog", "n_progs"])
def _bn_combine_kernel(x, part, mean, var, M, C, s_part, rows_per_prog, n_progs,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean and biased var (C,) in fp32 from the runs' (mean of x - x[0], M2) partials (n_progs, 2C): Chan's merge,
    as two fixed-order sums (of n_p mean_p, then of M2_p + n_p (mean_p - mean)^2); mean = x[0] + the merged mean."""
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    a_s = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_progs, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)  # [BP]
        b_n = tl.minimum(rows_per_prog, M - o_p * rows_per_prog).to(tl.float32)
        m = (o_p < n_progs)[:, None] & m_c[None, :]
        b_m = tl.load(part + o_p.to(tl.int64)[:, None] * s_part + o_c[None, :], mask=m, other=0.0)
        a_s += tl.where(m, b_m * b_n[:, None], 0.0)
    b_mean = tl.sum(a_s, axis=0) / M
    a_m2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_progs, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        b_n = tl.minimum(rows_per_prog, M - o_p * rows_per_prog).to(tl.float32)
        m = (o_p < n_progs)[:, None] & m_c[None, :]
        p_row = part + o_p.to(tl.int64)[:, None] * s_part + o_c[None, :]
        b_dev = tl.load(p_row, mask=m, other=0.0) - b_mean[None, :]
        b_m2 = tl.load(p_row + C, mask=m, other=0.0)
        a_m2 += tl.where(m, b_m2 + b_n[:, None] * b_dev * b_dev, 0.0)
    b_k = tl.load(x + o_c, mask=m_c, other=0.0).to(tl.float32)
    tl.store(mean + o_c, b_k + b_mean, mask=m_c)
    tl.store(var + o_c, tl.sum(a_m2, axis=0) / M, mask=m_c)


@triton.jit(do_not_specialize=["M"])
def _bn_apply_kernel(x, mean, var, w, b, y, M, C, s_x, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = (x - mean) * rstd * w + b on one [BLOCK_M, BLOCK_C] tile, max(y, 0) with RELU (y contiguous (M, C)).
    The ReLU is taken in fp32 before the rounding to y's dtype: the same as after it (rounding is monotone and
    keeps 0)."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    m = (o_m < M)[:, None] & m_c[None, :]
    b_mean, _, b_scale, b_shift = _bn_params(mean, var, w, b, o_c, m_c, eps, HAS_W, HAS_B)
    b_x = tl.load(x + o_m[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_y = _bn_out(b_x, b_mean, b_scale, b_shift)
    if RELU:
        b_y = tl.maximum(b_y, 0.0)
    tl.store(y + o_m[:, None] * C + o_c[None, :], cast(b_y, y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _bn_bwd_reduce_kernel(x, dy, mean, var, w, b, dx, part, M, C, s_x, s_dy, s_part, rows_per_prog, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, WRITE_DX: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[p] = [sum dy (C) | sum dy * xhat (C)] over the rows of run p (as in ``_bn_stats_kernel``); with
    WRITE_DX (statistics independent of x: eval mode) also dx = dy * w * rstd of those rows. With RELU, dy is
    the ReLU-masked gradient dy * [y > 0] throughout (``_relu_grad``; b is read only then)."""
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    b_mean, b_rstd, b_scale, b_shift = _bn_params(mean, var, w, b, o_c, m_c, eps, HAS_W, HAS_B)
    a_db = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    a_dw = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    row_start = i_p * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        o_m = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
        m = (o_m < row_end)[:, None] & m_c[None, :]  # [BM, BC]
        b_x = tl.load(x + o_m[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(dy + o_m[:, None] * s_dy + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = _relu_grad(b_g, b_x, b_mean, b_scale, b_shift, RELU)
        a_db += b_g  # zero off the mask
        a_dw += b_g * (b_x - b_mean[None, :]) * b_rstd[None, :]
        if WRITE_DX:
            tl.store(dx + o_m[:, None] * C + o_c[None, :], cast(b_g * b_scale[None, :], dx.dtype.element_ty),
                     mask=m)
    p_part = part + i_p.to(tl.int64) * s_part + o_c
    tl.store(p_part, tl.sum(a_db, axis=0), mask=m_c)
    tl.store(p_part + C, tl.sum(a_dw, axis=0), mask=m_c)


@triton.jit(do_not_specialize=["M"])
def _bn_bwd_elemt_kernel(x, dy, mean, var, w, b, sum_dy, sum_dy_xhat, dx, M, C, s_x, s_dy, eps,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, RELU: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """dx = w rstd (dy - sum dy / M - xhat sum(dy xhat) / M) on one [BLOCK_M, BLOCK_C] tile (batch statistics);
    with RELU, dy is dy * [y > 0] here and in the sums (b is read only then)."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    m = (o_m < M)[:, None] & m_c[None, :]
    b_mean, b_rstd, b_scale, b_shift = _bn_params(mean, var, w, b, o_c, m_c, eps, HAS_W, HAS_B)
    b_c1 = tl.load(sum_dy + o_c, mask=m_c, other=0.0) / M
    b_c2 = tl.load(sum_dy_xhat + o_c, mask=m_c, other=0.0) / M
    b_x = tl.load(x + o_m[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(dy + o_m[:, None] * s_dy + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_g = _relu_grad(b_g, b_x, b_mean, b_scale, b_shift, RELU)
    b_xhat = (b_x - b_mean[None, :]) * b_rstd[None, :]
    b_dx = (b_g - b_c1[None, :] - b_xhat * b_c2[None, :]) * b_scale[None, :]
    tl.store(dx + o_m[:, None] * C + o_c[None, :], cast(b_dx, dx.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and work buffer of this module is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(C: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, channel blocks) of a tile of about TILE_ELEMENTS elements."""
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(C))
    return max(1, TILE_ELEMENTS // block_c), block_c, triton.cdiv(C, block_c)


def _runs(M: int, block_m: int, n_cblocks: int, device: torch.device) -> tuple[int, int]:
    """(programs P along the rows, rows per program) of a reducing launch: P fixed runs of whole row blocks, about
    PROGRAMS_PER_SM per SM over all channel blocks (INTERPRETER_PROGRAMS off CUDA), no run empty."""
    return row_runs(M, block_m, device, PROGRAMS_PER_SM, INTERPRETER_PROGRAMS, n_cblocks)


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Launch the statistics: x (M, C), M >= 1 -> (mean, biased variance), (C,) each in fp32."""
    x = rows(x)
    M, C = x.shape
    block_m, block_c, n_cblocks = _tile(C)
    n_progs, rows_per_prog = _runs(M, block_m, n_cblocks, x.device)
    part = _empty((n_progs, 2 * C), torch.float32, x.device)
    _bn_stats_kernel[(n_progs, n_cblocks)](
        x, part, M, C, x.stride(0), part.stride(0), rows_per_prog,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=NUM_WARPS,
    )
    mean = _empty((C,), torch.float32, x.device)
    var = _empty((C,), torch.float32, x.device)
    _bn_combine_kernel[(triton.cdiv(C, COMBINE_BLOCK_C),)](
        x, part, mean, var, M, C, part.stride(0), rows_per_prog, n_progs,
        BLOCK_P=COMBINE_ROWS, BLOCK_C=COMBINE_BLOCK_C, num_warps=4,
    )
    return mean, var


def batch_norm_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float, relu: bool = False) -> Tensor:
    """Launch the normalisation: x (M, C) -> (x - mean) / sqrt(var + eps) * weight + bias, (M, C) in x's dtype;
    with relu, its ReLU."""
    x = rows(x)
    M, C = x.shape
    y = _empty((M, C), x.dtype, x.device)
    if M:
        block_m, block_c, n_cblocks = _tile(C)
        _bn_apply_kernel[(triton.cdiv(M, block_m), n_cblocks)](
            x, mean, var, x if weight is None else weight, x if bias is None else bias, y, M, C, x.stride(0), eps,
            HAS_W=weight is not None, HAS_B=bias is not None, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=NUM_WARPS,
        )
    return y


def batch_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float, batch_stats: bool, relu: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: (dx (M, C) in x's dtype, sum dy (C,), sum dy * xhat (C,), both in fp32).

    batch_stats: mean and var are x's own batch statistics (training), so dx carries their dependence on x;
    otherwise they are constants (running statistics). relu: dy is the gradient of the ReLU of the BatchNorm's
    output (``batch_norm_apply`` with relu), masked here by the recomputed output > 0, and the sums are of the
    masked dy. bias is read only with relu (it enters the output whose sign makes the mask)."""
    x, dy = rows(x), rows(dy)
    M, C = x.shape
    dx = _empty((M, C), x.dtype, x.device)
    block_m, block_c, n_cblocks = _tile(C)
    n_progs, rows_per_prog = _runs(M, block_m, n_cblocks, x.device)
    part = _empty((n_progs, 2 * C), torch.float32, x.device)
    w = x if weight is None else weight
    has_b = relu and bias is not None
    b = bias if has_b else x
    _bn_bwd_reduce_kernel[(n_progs, n_cblocks)](
        x, dy, mean, var, w, b, dx, part, M, C, x.stride(0), dy.stride(0), part.stride(0), rows_per_prog, eps,
        HAS_W=weight is not None, HAS_B=has_b, RELU=relu, WRITE_DX=not batch_stats, BLOCK_M=block_m,
        BLOCK_C=block_c, num_warps=NUM_WARPS,
    )
    sum_dy, sum_dy_xhat = reduce_partials(part, [((C,), torch.float32), ((C,), torch.float32)])
    if batch_stats:
        _bn_bwd_elemt_kernel[(triton.cdiv(M, block_m), n_cblocks)](
            x, dy, mean, var, w, b, sum_dy, sum_dy_xhat, dx, M, C, x.stride(0), dy.stride(0), eps,
            HAS_W=weight is not None, HAS_B=has_b, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=NUM_WARPS,
        )
    return dx, sum_dy, sum_dy_xhat


# ----------------------------------------------------------------------------------------------
# Custom ops and the autograd function
# ----------------------------------------------------------------------------------------------


batch_norm_stats_op = torch.library.custom_op(
    "mlla_fast::batch_norm_stats", batch_norm_stats, mutates_args=(), schema="(Tensor x) -> (Tensor, Tensor)",
)
batch_norm_apply_op = torch.library.custom_op(
    "mlla_fast::batch_norm_apply", batch_norm_apply, mutates_args=(),
    schema="(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, bool relu=False) -> Tensor",
)
batch_norm_bwd_op = torch.library.custom_op(
    "mlla_fast::batch_norm_bwd", batch_norm_bwd, mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
           "bool batch_stats, bool relu=False) -> (Tensor, Tensor, Tensor)",
)


@batch_norm_stats_op.register_fake
def _(x):
    C = x.shape[1]
    return x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


@batch_norm_apply_op.register_fake
def _(x, mean, var, weight, bias, eps, relu=False):
    return x.new_empty(x.shape)


@batch_norm_bwd_op.register_fake
def _(dy, x, mean, var, weight, bias, eps, batch_stats, relu=False):
    C = x.shape[1]
    return x.new_empty(x.shape), x.new_empty((C,), dtype=torch.float32), x.new_empty((C,), dtype=torch.float32)


class BatchNormTokensFunction(torch.autograd.Function):
    """(x - mean) / sqrt(var + eps) * weight + bias on x (M, C), and its ReLU with relu; Triton forward and
    backward.

    mean and var (C,) are taken as given, without gradient: with batch_stats they must be x's own batch mean and
    biased variance (``batch_norm_stats(x)``), and the backward formula carries their dependence on x; otherwise
    they are constants (running statistics). weight and bias may be None. The backward keeps x, the statistics
    and the parameters (the bias too with relu, for the mask), never the output.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                batch_stats: bool, relu: bool) -> Tensor:
        ctx.save_for_backward(x, mean, var, weight, bias if relu else None)
        ctx.args = (eps, batch_stats, relu, None if bias is None else bias.dtype)
        return torch.ops.mlla_fast.batch_norm_apply(x, mean, var, weight, bias, eps, relu)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, mean, var, weight, bias = ctx.saved_tensors
        eps, batch_stats, relu, bias_dtype = ctx.args
        dx, sum_dy, sum_dy_xhat = torch.ops.mlla_fast.batch_norm_bwd(dy, x, mean, var, weight, bias, eps,
                                                                     batch_stats, relu)
        dw = None if weight is None else sum_dy_xhat.to(weight.dtype)
        db = None if bias_dtype is None else sum_dy.to(bias_dtype)
        return dx, None, None, dw, db, None, None, None
