"""Column sums of a token-major matrix: the bias gradient of a Linear layer, ``db = dy.sum(0)``.

``column_sum(x, dtype)`` returns ``x.sum(0)`` for x (M, N) (unit column stride, any row stride; float32,
bfloat16 or float16) in ``dtype``, accumulated in fp32. PyTorch's own reduction of a bf16 (M, N) with M in
the hundred thousands and N = 64..512 runs at about a quarter of the memory bandwidth.

Two launches, deterministic (a fixed summation order, no atomics): ``_column_sum_partials_kernel`` splits
the rows into P fixed runs of whole row blocks, one program per (run, block of BLOCK_N columns), each
summing its run into an fp32 [BLOCK_M, BLOCK_N] tile in registers and writing the tile's column sums as
one row of fp32 partials (P, N); then ``dwconv.reduce_partials`` sums the P rows into the output. P is
about COLSUM_PROGRAMS_PER_SM programs per SM on a GPU, counted over all column blocks, and
INTERPRETER_PROGRAMS under Triton's interpreter (so that the tests make programs walk several row blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import fused_supported
from .dwconv import reduce_partials, row_runs

# Elements of one program's [BLOCK_M, BLOCK_N] tile (one loop step) and its warps: 32 elements per thread,
# 64 bytes of bf16 (four 16-byte loads) in flight per thread and step, 32 fp32 accumulators. BLOCK_N is at
# most MAX_BLOCK_N (512 contiguous bytes of a bf16 row).
COLSUM_TILE_ELEMENTS = 4096
COLSUM_NUM_WARPS = 4
MAX_BLOCK_N = 256
# Programs per SM over all column blocks (not measured yet): 32 KiB of bf16 tiles in flight per SM to cover
# the DRAM latency, and few enough partial rows (about 4 x 132 on an H100 or H200 for N <= 256) that the
# reduce over them is a few short steps.
COLSUM_PROGRAMS_PER_SM = 4
INTERPRETER_PROGRAMS = 4
# The row loop's software-pipelining depth (tl.range(num_stages=...)): the next row blocks' loads are in flight
# (cp.async into shared memory) while the current one is summed; 1 turns it off. Three column sums of a 1024²
# block step (C=64, B=2, bf16, H200): 0.248 ms at 3 stages, 0.317 ms without (session 13, call B).
COLSUM_STAGES = 3

__all__ = ["column_sum", "column_sum_fwd"]


@triton.jit
def _column_sum_partials_kernel(
    x, part, M, N, s_row, s_part, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """part[p, j] = sum of x[i, j] over the rows i of run p, [p * rows_per_prog, (p + 1) * rows_per_prog),
    for the columns j of this program's block, in fp32 (rows_per_prog a multiple of BLOCK_M)."""
    i_p, i_n = tl.program_id(0), tl.program_id(1)
    o_j = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_j = o_j < N
    row_start = i_p * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=STAGES):
        o_r = r0 + tl.arange(0, BLOCK_M)
        offs = o_r.to(tl.int64)[:, None] * s_row + o_j[None, :]
        acc += tl.load(x + offs, mask=(o_r < row_end)[:, None] & m_j[None, :], other=0.0).to(tl.float32)
    tl.store(part + i_p.to(tl.int64) * s_part + o_j, tl.sum(acc, 0), mask=m_j)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every work buffer of this module is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_input(x: Tensor, dtype: torch.dtype) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor (rows, columns), got shape {tuple(x.shape)}")
    reason = fused_supported(x)
    if reason is not None:
        raise ValueError(f"x: {reason}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x: expected contiguous columns (column stride 1), got strides {x.stride()}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")


def _launch_geometry(M: int, N: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, programs along the rows P, rows per program): P runs of whole row blocks, about
    COLSUM_PROGRAMS_PER_SM programs per SM over all column blocks (INTERPRETER_PROGRAMS off CUDA), at
    least one, and no run empty."""
    block_n = min(MAX_BLOCK_N, triton.next_power_of_2(N))
    block_m = max(1, COLSUM_TILE_ELEMENTS // block_n)
    n_progs, rows_per_prog = row_runs(M, block_m, device, COLSUM_PROGRAMS_PER_SM, INTERPRETER_PROGRAMS,
                                      triton.cdiv(N, block_n))
    return block_m, block_n, n_progs, rows_per_prog


def column_sum_fwd(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Launch ``column_sum``: x (M, N) -> (N,) in dtype, the fp32 column sums of x."""
    _check_input(x, dtype)
    M, N = x.shape
    if N == 0:
        return _empty((0,), dtype, x.device)
    block_m, block_n, n_progs, rows_per_prog = _launch_geometry(M, N, x.device)
    part = _empty((n_progs, N), torch.float32, x.device)
    _column_sum_partials_kernel[(n_progs, triton.cdiv(N, block_n))](
        x, part, M, N, x.stride(0), part.stride(0), rows_per_prog,
        BLOCK_M=block_m, BLOCK_N=block_n, STAGES=COLSUM_STAGES, num_warps=COLSUM_NUM_WARPS,
    )
    (total,) = reduce_partials(part, [((N,), dtype)])
    return total


@torch.library.custom_op("mlla_fast::column_sum", mutates_args=(), schema="(Tensor x, ScalarType dtype) -> Tensor")
def _column_sum_op(x, dtype):
    return column_sum_fwd(x, dtype)


@_column_sum_op.register_fake
def _(x, dtype):
    return x.new_empty((x.shape[1],), dtype=dtype)


def column_sum(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sum over the rows of x, accumulated in fp32, deterministic.

    Args:
        x: (M, N) float32/bfloat16/float16 on CUDA (or on the CPU under Triton's interpreter), columns
            contiguous (column stride 1), any row stride (e.g. a row slice or a column slice of a wider tensor).
        dtype: the output's dtype.

    Returns:
        (N,) ``x.sum(0)`` in dtype. Not differentiable (it computes gradients).
    """
    _check_input(x, dtype)
    return torch.ops.mlla_fast.column_sum(x, dtype)
