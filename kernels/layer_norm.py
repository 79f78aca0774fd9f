"""LayerNorm over the channels of token-major activations, forward and backward in Triton.

``layer_norm(x, weight, bias, eps)`` = ``F.layer_norm(x, (C,), weight, bias, eps)`` for x (..., C) with
contiguous channels (C <= MAX_CHANNELS), float32, bfloat16 or float16, statistics and arithmetic in fp32.
It serves the U-Net's LayerNorms outside the blocks (EUSM's last norm, the bottleneck ``norm`` and
``norm_up``), where PyTorch's own kernels run at about a tenth of the memory bandwidth on rows of 64..512
channels (H200, MLLA-UNet-T at 224², batch 48, bf16).

- ``_layer_norm_fwd_kernel``, one program per BLOCK_M rows: a [BLOCK_M, BLOCK_C] tile holds whole rows
  (BLOCK_C = next_power_of_2(C), several rows per program when C is small), so mean and variance are row
  sums in registers; y is written in the output dtype.
- ``_layer_norm_bwd_kernel``, P programs, each walking a fixed run of row blocks: recomputes the row
  statistics from x, writes ``dx = rstd (w dy - mean(w dy) - xhat mean(w dy xhat))`` in x's dtype, and
  accumulates ``dy xhat`` and ``dy`` element-wise over its rows into fp32 tiles, summed over rows once at the
  end into one row of fp32 partials (P, 2C); ``dwconv.reduce_partials`` sums the P rows in a fixed order
  (deterministic, no atomics) into the weight and bias gradients, in the parameters' dtypes.

The backward recomputes mean and rstd instead of reading them saved by the forward: it loads the whole row
of x anyway, so the statistics are two more row sums in registers and cost no memory traffic, and the op
keeps only its input for the backward (no (M,) side outputs to allocate, save and pass through the custom
op). The recomputation runs the forward's code (``_row_stats``), so xhat is the forward's.

The output dtype is the one ``F.layer_norm`` gives in the caller's context: fp32 where autocast runs
LayerNorm in fp32 (CUDA), otherwise x's dtype. A bf16 x is read as it is (no cast kernel first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..backend import fused_supported
from .dwconv import reduce_partials, row_runs, rows
from .lowp import cast

# The widest row a tile holds (one row of BLOCK_C = 4096 fp32 values per program, 16 per thread in the
# backward's 8 warps, next to its two accumulators): the U-Net's norms have at most 1024 channels.
MAX_CHANNELS = 4096
# Elements of a [BLOCK_M, BLOCK_C] tile: 64 rows at C = 64, one row at C = 4096. As in the shuffle + LayerNorm
# kernels of kernels/sampling.py, whose launch settings these take (not swept for this op on a GPU).
TILE_ELEMENTS = 4096
FWD_NUM_WARPS = 4
# The backward keeps two tile-sized fp32 accumulators across its row loop: 8 warps hold 16 elements per thread
# of each at 4096 elements. Compiled offline for sm_90a (Triton 3.9, C = 32..4096, strides divisible by 16 as
# in real launches): forward 60-79 registers (128 at bf16 C = 4096), backward at most 128, no spills.
BWD_NUM_WARPS = 8
# Backward programs per SM (their fp32 partial rows are summed by reduce_partials afterwards), and the programs
# under Triton's interpreter, few so that the tests make programs walk several row blocks.
BWD_PROGRAMS_PER_SM = 8
INTERPRETER_PROGRAMS = 3
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["MAX_CHANNELS", "layer_norm", "layer_norm_bwd", "layer_norm_fwd"]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(b_x, m, C, eps):
    """(x - mean) zeroed off the mask m, and rstd = 1 / sqrt(var + eps), of the rows of an fp32 tile b_x
    [BLOCK_M, BLOCK_C] whose masked-off elements are zero."""
    b_mean = tl.sum(b_x, axis=1) / C
    b_xc = tl.where(m, b_x - b_mean[:, None], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / C + eps)
    return b_xc, b_rstd


@triton.jit(do_not_specialize=["M"])
def _layer_norm_fwd_kernel(x, w, b, y, M, C, s_x, eps, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y[i] = (x[i] - mean) * rstd * w + b for the BLOCK_M rows i of this program (y contiguous (M, C))."""
    o_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    o_c = tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    m = (o_m < M)[:, None] & m_c[None, :]  # [BM, BC]
    b_x = tl.load(x + o_m[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_xc, b_rstd = _row_stats(b_x, m, C, eps)
    b_w = tl.load(w + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_b = tl.load(b + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_y = b_xc * b_rstd[:, None] * b_w[None, :] + b_b[None, :]
    tl.store(y + o_m[:, None] * C + o_c[None, :], cast(b_y, y.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _layer_norm_bwd_kernel(x, dy, w, dx, part, M, C, s_x, s_dy, s_part, rows_per_prog, eps,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx for the rows [p * rows_per_prog, (p + 1) * rows_per_prog) of program p (rows_per_prog a multiple of
    BLOCK_M; dx contiguous (M, C)), and partial row p = [sum dy * xhat (C) | sum dy (C)] over those rows."""
    i_p = tl.program_id(0)
    o_c = tl.arange(0, BLOCK_C)  # [BC]
    m_c = o_c < C
    b_w = tl.load(w + o_c, mask=m_c, other=0.0).to(tl.float32)
    a_dw = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    a_db = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    row_start = i_p * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        o_m = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
        m = (o_m < row_end)[:, None] & m_c[None, :]  # [BM, BC]
        b_x = tl.load(x + o_m[:, None] * s_x + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(dy + o_m[:, None] * s_dy + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_xc, b_rstd = _row_stats(b_x, m, C, eps)
        b_xhat = b_xc * b_rstd[:, None]
        b_wg = b_g * b_w[None, :]
        c1 = tl.sum(b_xhat * b_wg, axis=1) / C  # [BM]
        c2 = tl.sum(b_wg, axis=1) / C
        b_dx = (b_wg - b_xhat * c1[:, None] - c2[:, None]) * b_rstd[:, None]
        tl.store(dx + o_m[:, None] * C + o_c[None, :], cast(b_dx, dx.dtype.element_ty), mask=m)
        a_dw += b_g * b_xhat  # b_g is zero off the mask
        a_db += b_g
    p_part = part + i_p.to(tl.int64) * s_part + o_c
    tl.store(p_part, tl.sum(a_dw, axis=0), mask=m_c)
    tl.store(p_part + C, tl.sum(a_db, axis=0), mask=m_c)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and work buffer of this module is allocated here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _tile(C: int) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_C >= C channels) of a tile of about TILE_ELEMENTS elements holding whole rows."""
    block_c = triton.next_power_of_2(C)
    return max(1, TILE_ELEMENTS // block_c), block_c


def _bwd_runs(M: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs P, rows per program) of the backward: P fixed runs of whole row blocks, about
    BWD_PROGRAMS_PER_SM per SM (INTERPRETER_PROGRAMS off CUDA), no run empty and at least one program."""
    return row_runs(M, block_m, device, BWD_PROGRAMS_PER_SM, INTERPRETER_PROGRAMS)


def layer_norm_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float, fp32_out: bool) -> Tensor:
    """Launch the forward: x (..., C) -> y (..., C) contiguous, in fp32 if fp32_out else in x's dtype."""
    C = x.shape[-1]
    x2 = rows(x)
    M = x2.shape[0]
    y = _empty(tuple(x.shape), torch.float32 if fp32_out else x.dtype, x.device)
    if M:
        block_m, block_c = _tile(C)
        _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2, weight.contiguous(), bias.contiguous(), y, M, C, x2.stride(0), eps,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=FWD_NUM_WARPS,
        )
    return y


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the backward: (dx in x's dtype and shape, dweight in weight's dtype, dbias in bias's dtype)."""
    C = x.shape[-1]
    x2, dy2 = rows(x), rows(dy)
    M = x2.shape[0]
    dx = _empty(tuple(x.shape), x.dtype, x.device)
    block_m, block_c = _tile(C)
    n_progs, rows_per_prog = _bwd_runs(M, block_m, x.device)
    part = _empty((n_progs, 2 * C), torch.float32, x.device)
    _layer_norm_bwd_kernel[(n_progs,)](
        x2, dy2, weight.contiguous(), dx, part, M, C, x2.stride(0), dy2.stride(0), part.stride(0), rows_per_prog,
        eps, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=BWD_NUM_WARPS,
    )
    dweight, dbias = reduce_partials(part, [((C,), weight.dtype), ((C,), bias.dtype)])
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


layer_norm_fwd_op = torch.library.custom_op(
    "mlla_fast::layer_norm_fwd", layer_norm_fwd, mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, float eps, bool fp32_out) -> Tensor",
)
layer_norm_bwd_op = torch.library.custom_op(
    "mlla_fast::layer_norm_bwd", layer_norm_bwd, mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)",
)


@layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, fp32_out):
    return x.new_empty(x.shape, dtype=torch.float32 if fp32_out else x.dtype)


@layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, _ = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    return (*layer_norm_bwd_op(dy, x, weight, bias, ctx.eps), None, None)


layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Argument checks and the public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected a tensor of shape (..., C) with C >= 1, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C > MAX_CHANNELS:
        raise ValueError(f"x: the LayerNorm kernels take at most {MAX_CHANNELS} channels, got {C}")
    reason = fused_supported(x)
    if reason is not None:
        raise ValueError(f"x: {reason}")
    if C > 1 and x.stride(-1) != 1:
        raise ValueError(f"x: expected contiguous channels (last-dimension stride 1), got strides {x.stride()}")
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
        if tuple(p.shape) != (C,):
            raise ValueError(f"{name}: expected shape ({C},) for x of {C} channels, got {tuple(p.shape)}")
        if p.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"{name}: expected a float32, bfloat16 or float16 tensor, got dtype {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got one on {p.device}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def returns_fp32(t: Tensor, C: int) -> bool:
    """Whether ``F.layer_norm`` over C channels of a tensor like t returns fp32 here: autocast runs LayerNorm in
    fp32 on CUDA (an empty call; no kernel)."""
    return F.layer_norm(t.new_empty((0, C)), (C,)).dtype == torch.float32


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension, ``F.layer_norm(x, (C,), weight, bias, eps)``, on Triton kernels.

    Args:
        x: (..., C) float32/bfloat16/float16 on CUDA (or on the CPU under Triton's interpreter), channels
            contiguous (last-dimension stride 1), C <= MAX_CHANNELS; leading dimensions that cannot be
            flattened without a copy are copied.
        weight, bias: (C,) affine parameters, float32/bfloat16/float16 (gradients come back in their dtypes).
        eps: added to the variance.

    Returns:
        (..., C) contiguous, in the dtype ``F.layer_norm`` gives here: fp32 where autocast runs LayerNorm in
        fp32 (CUDA), else x's dtype. Differentiable in x, weight and bias, deterministically; a torch custom op
        (``mlla_fast::layer_norm_fwd`` and ``_bwd``).
    """
    _check_inputs(x, weight, bias, eps)
    C = x.shape[-1]
    fp32_out = returns_fp32(x, C)
    return layer_norm_fwd_op(x, weight, bias, float(eps), fp32_out)
