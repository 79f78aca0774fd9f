"""Fused MLLA linear attention with LePE and gate (SPEC §2) in Triton, forward and backward.

``linear_attention(qk, v, g, lepe_weight, lepe_bias, hw, num_heads)`` mirrors
``reference.ops.linear_attention_ref`` argument for argument and returns ``(attention(v) + lepe(v)) * g``.

Layout: token-major ``(B, N, C)`` tensors whose channel stride is 1 (batch and token strides are
free, so a slice of a wider GEMM output is read in place); heads are contiguous 32-channel slices.
Every program works on one (batch, head) and a block of tokens. Inside a head the 16 RoPE pairs
(2p, 2p+1) are loaded as two [BLOCK_N, 16] halves ("a" = even channels, "b" = odd channels), so the
rotation is plain elementwise math; the d x d state kv is kept in that split order (rows 0-15 the
a-pairs, rows 16-31 the b-pairs), as is the d-vector mean phi(k).

Forward: ``_la_fwd_reduce_kernel`` (partials of kv and sum phi(k) over token ranges, summed in a fixed
order by ``dwconv.reduce_partials``: deterministic), then ``_la_fwd_out_kernel`` (one pass over tokens: phi, RoPE,
q~ . kv, normaliser, LePE stencil, gate). Backward: with a gate, ``_la_fwd_out_kernel`` again in its
GATE_GRAD variant (dg and the gated output gradient do = dy * gate); ``_la_bwd_q_kernel`` (what needs only
the forward's state and do: dq, and partials of dKV and of the normaliser's k-side vector); the LePE
weight/bias gradients from do and v by the depthwise-conv parameter-gradient kernel of
``kernels/dwconv.py`` (element-wise accumulators over 2-D tiles, one reduction per program); then
``_la_bwd_kv_kernel`` (dk; dv through kv and the transposed LePE stencil of do).
Only the inputs and kv, mean phi(k) (O(B h d^2)) are kept for the backward; everything else is
recomputed. The derivation is in ``kernels/README.md``.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..backend import interpreter_enabled, multiprocessors
from ..reference.ops import NORMALISER_EPS, rope_frequencies
from .dwconv import block_runs, depthwise_param_grads, reduce_partials
from .lowp import cast, mma

HEAD_DIM = 32
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TOKENS = 2**31 - 1 - 4096  # token indices (and their stencil neighbours) are int32 inside the kernels
# RoPE angles reach thousands of radians: compiled kernels call libdevice's cosf/sinf (full range reduction)
# explicitly; the interpreter has no libdevice and evaluates tl.cos/tl.sin with numpy.
_LIBDEVICE_TRIG = tl.constexpr(not interpreter_enabled())
INV_TWO_PI = tl.constexpr(0.15915494309189535)
# 2 pi = TWO_PI_1 + TWO_PI_2 + TWO_PI_3, the first two with 8 significant bits: turns * each is exact below 2^16
TWO_PI_1 = tl.constexpr(201 / 32)
TWO_PI_2 = tl.constexpr(507 / 2**18)
TWO_PI_3 = tl.constexpr(2 * math.pi - 201 / 32 - 507 / 2**18)
REDUCED_TRIG_MAX_POSITION = 400_000  # trig="reduced" up to this grid side (2^16 turns = 411,774 rad); "compute" past it
LOWP_DOT_PRECISIONS = ("tf32", "ieee", "lowp-operands")
TRIG_MODES = ("compute", "reduced", "table")
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """Launch parameters of the four kernels (tokens per block, warps), to tune per card.

    Block sizes must be powers of two >= 16 (tl.dot tiles). All kernels but the forward output pass
    loop over token blocks: each (batch, head) gets about
    ``programs_per_sm * SMs / (B * heads)`` programs, each summing a contiguous token range.
    ``lowp_dot_precision`` is how bf16/fp16 activations' tl.dots are taken: on fp32 tiles at input precision
    "tf32" or "ieee", or ("lowp-operands") on the tiles rounded to the activation dtype (bf16/fp16 tensor-core
    products, fp32 accumulation; kernels/README.md lists the dots); fp32 activations always use "ieee" so the
    fp32 path meets the 1e-5 rule. ``pair_loads``:
    "split" loads a head's 32 channels at once and splits the RoPE pairs in registers, "strided" loads
    the even and odd channels separately. ``trig``: "compute" evaluates cos/sin in the kernels from fp32
    angles with libdevice's cosf/sinf, "reduced" (the default) reduces the fp32 angles to [-pi, pi] and
    takes the hardware's approximate cos/sin there (absolute error about 5e-7; about a third of the
    kernels' SASS instructions: libdevice's range reduction dominated them), "table" gathers them from a
    cached (max(H, W), C/4, 2) table computed in float64 (the reference's own values) — slower on an H200
    (fwd+bwd at 2x512²x64 bf16: 2.59 ms against 2.30 ms for "compute").
    The defaults are the best of ``benchmarks/attention.py --tune`` on an H200 (see its results), except the
    q-side backward's: 32 tokens and 2 warps took 1.75 ms against 2.18 ms for 64 tokens and 4 warps at 1024²
    (B=2, C=64, bf16, H200, session 5's sweep), its registers being the limit; and the dots' precision:
    "lowp-operands" took 6.44 ms against 6.79 ms for "tf32" at 1024² (1.67 against 1.76 ms at 512², each
    kernel faster; H200, session 6, ``benchmarks/results/nvidia-h200/2026-11-27-session6``). Session 7's tune
    at 1024² (H200, with trig="reduced"): the output pass on 4 warps instead of 8, 3.74 ms against 4.42 ms.
    ``<kernel>_maxnreg``: ptxas's register cap per thread for that kernel (0: none, ptxas's choice), so that more
    programs fit on an SM (the output pass: 168 registers, 3 programs of 4 warps; the q-side backward 230, 4
    programs of 2 warps; H200, session 15). No cap has been timed yet.
    """

    fwd_reduce_block_n: int = 64
    fwd_reduce_warps: int = 4
    fwd_out_block_n: int = 64
    fwd_out_warps: int = 4
    bwd_q_block_n: int = 32
    bwd_q_warps: int = 2
    bwd_kv_block_n: int = 64
    bwd_kv_warps: int = 8
    fwd_reduce_maxnreg: int = 0
    fwd_out_maxnreg: int = 0
    bwd_q_maxnreg: int = 0
    bwd_kv_maxnreg: int = 0
    programs_per_sm: int = 4
    lowp_dot_precision: str = "lowp-operands"
    pair_loads: str = "split"
    trig: str = "reduced"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("block_n") and (value < 16 or value & (value - 1)):
                raise ValueError(f"{field.name}: expected a power of two >= 16, got {value}")
            if field.name.endswith("maxnreg") and value and not 24 <= value <= 255:
                raise ValueError(f"{field.name}: expected 0 (no cap) or a register count in [24, 255], got {value}")
        if self.lowp_dot_precision not in LOWP_DOT_PRECISIONS:
            raise ValueError(f"lowp_dot_precision: expected one of {LOWP_DOT_PRECISIONS}, "
                             f"got {self.lowp_dot_precision!r}")
        if self.pair_loads not in ("split", "strided"):
            raise ValueError(f"pair_loads: expected 'split' or 'strided', got {self.pair_loads!r}")
        if self.trig not in TRIG_MODES:
            raise ValueError(f"trig: expected one of {TRIG_MODES}, got {self.trig!r}")

    def with_overrides(self, overrides: list[str]) -> "LinearAttentionConfig":
        """This configuration with FIELD=VALUE strings applied (values converted to the field's type)."""
        types = {field.name: type(getattr(self, field.name)) for field in dataclasses.fields(self)}
        changes = {}
        for override in overrides:
            name, sep, value = override.partition("=")
            if not sep or name not in types:
                raise ValueError(f"expected FIELD=VALUE with FIELD one of {sorted(types)}, got {override!r}")
            changes[name] = types[name](value)
        return dataclasses.replace(self, **changes)


CONFIG = LinearAttentionConfig()


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _phi(x):
    """phi(x) = ELU(x) + 1 and its derivative (1 for x > 0, exp(x) = phi(x) otherwise)."""
    e = tl.exp(tl.minimum(x, 0.0))
    return tl.where(x > 0, x + 1.0, e), tl.where(x > 0, 1.0, e)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b (fp32 accumulation; acc may be None) of fp32 tiles: taken at DOT_PRECISION when DOT_DTYPE is
    fp32, else on the tiles rounded (to nearest even) to DOT_DTYPE, bf16 or fp16."""
    if DOT_DTYPE.is_fp32():
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return mma(cast(a, DOT_DTYPE), cast(b, DOT_DTYPE), acc, DOT_PRECISION)


@triton.jit
def _rope_cos_sin(b_row, b_col, p_trig, n_pos, i_h, C_QUARTER: tl.constexpr, TRIG: tl.constexpr):
    """cos and sin [BN, 16] of the RoPE angles of head i_h's 16 pairs at grid rows/columns [BN] (int32).

    Global pair j < C/4 turns by row * theta_j, pair j >= C/4 by col * theta_(j - C/4).
    TRIG "table": p_trig is the (max(H, W), C/4, 2) fp32 table of cos/sin(pos * theta_j) (a few hundred KB,
    L2-resident), gathered (positions clamped to n_pos - 1: padding tokens past the grid read a valid
    row). Otherwise p_trig holds theta_j (C/2,) and the angle is one fp32 product, whose cos/sin are
    "compute": libdevice's cosf/sinf (full range reduction, a few ulps); "reduced": the angle reduced to
    [-pi, pi] by a three-constant Cody-Waite step (for angles below 2^16 turns) and the hardware's
    approximate sin/cos there (absolute error about 5e-7), one reduction for both and no slow path.
    """
    o_j = i_h * 16 + tl.arange(0, 16)
    m_row = (o_j < C_QUARTER)[None, :]
    if TRIG == "table":
        o_jj = tl.where(o_j < C_QUARTER, o_j, o_j - C_QUARTER)
        b_pos = tl.minimum(tl.where(m_row, b_row[:, None], b_col[:, None]), n_pos - 1)
        p = p_trig + (b_pos * C_QUARTER + o_jj[None, :]) * 2
        b_cos = tl.load(p)
        b_sin = tl.load(p + 1)
    else:
        b_theta = tl.load(p_trig + o_j)
        b_pos = tl.where(m_row, b_row.to(tl.float32)[:, None], b_col.to(tl.float32)[:, None])
        b_angle = b_pos * b_theta[None, :]
        if TRIG == "reduced":
            b_turns = tl.floor(b_angle * INV_TWO_PI + 0.5)
            b_angle = b_angle - b_turns * TWO_PI_1  # exact, as is the next step
            b_angle = b_angle - b_turns * TWO_PI_2
            b_angle = b_angle - b_turns * TWO_PI_3
            if _LIBDEVICE_TRIG:
                b_cos = libdevice.fast_cosf(b_angle)
                b_sin = libdevice.fast_sinf(b_angle)
            else:
                b_cos = tl.cos(b_angle)
                b_sin = tl.sin(b_angle)
        elif _LIBDEVICE_TRIG:
            b_cos = libdevice.cos(b_angle)
            b_sin = libdevice.sin(b_angle)
        else:
            b_cos = tl.cos(b_angle)
            b_sin = tl.sin(b_angle)
    return b_cos, b_sin


@triton.jit
def _load_pairs(p_head, o_row, m_n, SPLIT_PAIRS: tl.constexpr):
    """The even ("a") and odd ("b") channels [BN, 16] of a 32-channel head, as fp32 (0 where masked).

    SPLIT_PAIRS: one contiguous [BN, 32] load split in registers; otherwise two stride-2 loads.
    """
    if SPLIT_PAIRS:
        o_d = tl.arange(0, 32)
        b_x = tl.load(p_head + o_row[:, None] + o_d[None, :], mask=m_n[:, None], other=0.0).to(tl.float32)
        b_a, b_b = tl.split(tl.reshape(b_x, [b_x.shape[0], 16, 2]))
    else:
        o_p = tl.arange(0, 16)
        p = p_head + o_row[:, None] + 2 * o_p[None, :]
        b_a = tl.load(p, mask=m_n[:, None], other=0.0).to(tl.float32)
        b_b = tl.load(p + 1, mask=m_n[:, None], other=0.0).to(tl.float32)
    return b_a, b_b


@triton.jit
def _k_pairs(p_x, o_row, m_n, i_h, p_w, p_b, C: tl.constexpr, BLOCK_N: tl.constexpr, PROJECT: tl.constexpr,
              HAS_PBIAS: tl.constexpr, SPLIT_PAIRS: tl.constexpr):
    """Head i_h's even ("a") and odd ("b") channels [BN, 16] of k at the tokens whose rows start at the element
    offsets o_row [BN] from p_x (the batch's base pointer), as fp32, 0 where masked.

    Without PROJECT, loaded from the (B, N, C) k. With PROJECT (``Projected``), p_x is the attention input v
    (B, N, C) and k is projected here: the head's channels of v W^T + b (W (C, C) contiguous at p_w, b (C,) at
    p_b), C/32 dots of 32 input channels with fp32 accumulation, rounded to v's dtype as a GEMM's output would
    be; no (B, N, C) k is written or read."""
    if PROJECT:
        o_p = tl.arange(0, 16)
        o_k = tl.arange(0, 32)
        acc_a = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        p_wa = p_w + (i_h * 32 + 2 * o_p)[None, :] * C + o_k[:, None]  # [32, 16]: W[2p, k], the even rows
        for c0 in tl.static_range(0, C, 32):
            b_x = tl.load(p_x + o_row[:, None] + (c0 + o_k)[None, :], mask=m_n[:, None], other=0.0)
            acc_a = mma(b_x, tl.load(p_wa + c0), acc_a, "ieee")
            acc_b = mma(b_x, tl.load(p_wa + C + c0), acc_b, "ieee")
        if HAS_PBIAS:
            acc_a += tl.load(p_b + i_h * 32 + 2 * o_p).to(tl.float32)[None, :]
            acc_b += tl.load(p_b + i_h * 32 + 2 * o_p + 1).to(tl.float32)[None, :]
        b_a = tl.where(m_n[:, None], cast(acc_a, p_x.dtype.element_ty).to(tl.float32), 0.0)
        b_b = tl.where(m_n[:, None], cast(acc_b, p_x.dtype.element_ty).to(tl.float32), 0.0)
        return b_a, b_b
    return _load_pairs(p_x + i_h * 32, o_row, m_n, SPLIT_PAIRS)


@triton.jit
def _store_pairs(p_head, o_row, m_n, b_a, b_b, SPLIT_PAIRS: tl.constexpr):
    """Store even/odd halves [BN, 16] back as the interleaved channels of a 32-channel head."""
    if SPLIT_PAIRS:
        o_d = tl.arange(0, 32)
        b_x = tl.reshape(tl.join(b_a, b_b), [b_a.shape[0], 32])
        tl.store(p_head + o_row[:, None] + o_d[None, :], b_x.to(p_head.dtype.element_ty), mask=m_n[:, None])
    else:
        o_p = tl.arange(0, 16)
        p = p_head + o_row[:, None] + 2 * o_p[None, :]
        tl.store(p, b_a.to(p_head.dtype.element_ty), mask=m_n[:, None])
        tl.store(p + 1, b_b.to(p_head.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _load_state(p, o_bh):
    """A [32, 32] state in split order, returned as its a-rows and b-rows [16, 32]."""
    o_p = tl.arange(0, 16)
    o_d = tl.arange(0, 32)
    p_a = p + o_bh * 1024 + o_p[:, None] * 32 + o_d[None, :]
    return tl.load(p_a), tl.load(p_a + 512)


@triton.jit
def _store_state(p, o_start, b_a, b_b):
    o_p = tl.arange(0, 16)
    o_d = tl.arange(0, 32)
    p_a = p + o_start + o_p[:, None] * 32 + o_d[None, :]
    tl.store(p_a, b_a)
    tl.store(p_a + 512, b_b)


@triton.jit
def _la_fwd_reduce_kernel(
    p_k, p_wk, p_bk, p_v, p_trig, p_kv_part, p_ksum_part,
    N, W, n_pos, blocks_per_split,
    s_k_b, s_k_n, s_v_b, s_v_n, s_part,
    C: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT_PAIRS: tl.constexpr, TRIG: tl.constexpr, PROJECT: tl.constexpr,
    HAS_PBIAS: tl.constexpr,
):
    """Partial sums over one token range of kv = sum_m k~_m v_m^T and sum_m phi(k_m), per (batch, head).

    Grid (splits, B * heads); writes kv_part[split, bh] [32, 32] and ksum_part[split, bh] [32], both views
    into one partials buffer with row stride s_part per split. PROJECT: k = v W_k^T + b_k is computed here
    (p_k is v, p_wk and p_bk the projection; ``_k_pairs``).
    """
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // NUM_HEADS).to(tl.int64)
    i_h = i_bh % NUM_HEADS
    o_t = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, 32)
    p_kb = p_k + i_b * s_k_b
    p_vh = p_v + i_b * s_v_b + i_h * 32

    b_kv_a = tl.zeros([16, 32], dtype=tl.float32)
    b_kv_b = tl.zeros([16, 32], dtype=tl.float32)
    b_ks_a = tl.zeros([BLOCK_N, 16], dtype=tl.float32)  # element-wise: summed over tokens once, after the loop
    b_ks_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    blk_start = i_s * blocks_per_split
    blk_end = tl.minimum(blk_start + blocks_per_split, tl.cdiv(N, BLOCK_N))
    for i_blk in range(blk_start, blk_end):
        o_n = i_blk * BLOCK_N + o_t
        m_n = o_n < N
        o_n64 = o_n.to(tl.int64)
        b_ka, b_kb = _k_pairs(p_kb, o_n64 * s_k_n, m_n, i_h, p_wk, p_bk, C, BLOCK_N, PROJECT, HAS_PBIAS, SPLIT_PAIRS)
        b_ka, _ = _phi(b_ka)
        b_kb, _ = _phi(b_kb)
        # phi(0) = 1: padding tokens must not count in sum phi(k)
        b_ka = tl.where(m_n[:, None], b_ka, 0.0)
        b_kb = tl.where(m_n[:, None], b_kb, 0.0)
        b_cos, b_sin = _rope_cos_sin(o_n // W, o_n % W, p_trig, n_pos, i_h, C // 4, TRIG)
        b_kra = b_ka * b_cos - b_kb * b_sin  # [BN, 16]
        b_krb = b_ka * b_sin + b_kb * b_cos
        b_v = tl.load(p_vh + o_n64[:, None] * s_v_n + o_d[None, :], mask=m_n[:, None], other=0.0).to(tl.float32)
        b_kv_a = _dot(tl.trans(b_kra), b_v, b_kv_a, DOT_DTYPE, DOT_PRECISION)  # [16, 32]
        b_kv_b = _dot(tl.trans(b_krb), b_v, b_kv_b, DOT_DTYPE, DOT_PRECISION)
        b_ks_a += b_ka
        b_ks_b += b_kb

    o_row = i_s.to(tl.int64) * s_part  # this split's row of the partials buffer: kv of every (b, h), then ksum
    _store_state(p_kv_part, o_row + i_bh * 1024, b_kv_a, b_kv_b)
    o_p = tl.arange(0, 16)
    tl.store(p_ksum_part + o_row + i_bh * 32 + o_p, tl.sum(b_ks_a, axis=0))
    tl.store(p_ksum_part + o_row + i_bh * 32 + 16 + o_p, tl.sum(b_ks_b, axis=0))


@triton.jit
def _attention_numerator(p_q, s_q_n, p_trig, n_pos, p_kv, p_ksum, o_n, b_row, b_col, m_n, i_bh, i_h,
                         C_QUARTER: tl.constexpr, EPS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, SPLIT_PAIRS: tl.constexpr, TRIG: tl.constexpr):
    """Recompute q's features at tokens o_n: returns phi(q) halves, their ELU' halves, q~ halves,
    cos, sin [BN, 16], the numerator q~ . kv [BN, 32] and the normaliser z [BN]."""
    b_qa, b_qb = _load_pairs(p_q, o_n.to(tl.int64) * s_q_n, m_n, SPLIT_PAIRS)
    b_qa, b_dqa = _phi(b_qa)
    b_qb, b_dqb = _phi(b_qb)
    b_cos, b_sin = _rope_cos_sin(b_row, b_col, p_trig, n_pos, i_h, C_QUARTER, TRIG)
    b_qra = b_qa * b_cos - b_qb * b_sin
    b_qrb = b_qa * b_sin + b_qb * b_cos
    b_kv_a, b_kv_b = _load_state(p_kv, i_bh)
    b_num = _dot(b_qra, b_kv_a, None, DOT_DTYPE, DOT_PRECISION)
    b_num = _dot(b_qrb, b_kv_b, b_num, DOT_DTYPE, DOT_PRECISION)  # [BN, 32]
    o_p = tl.arange(0, 16)
    b_ks_a = tl.load(p_ksum + i_bh * 32 + o_p)
    b_ks_b = tl.load(p_ksum + i_bh * 32 + 16 + o_p)
    b_den = tl.sum(b_qa * b_ks_a[None, :], axis=1) + tl.sum(b_qb * b_ks_b[None, :], axis=1) + EPS
    b_z = 1.0 / b_den
    return b_qa, b_qb, b_dqa, b_dqb, b_qra, b_qrb, b_cos, b_sin, b_num, b_z


@triton.jit
def _stencil_masks(b_row, b_col, m_n, H, W):
    """Per token [BN] at (b_row, b_col): whether the grid row above / below and the column left / right exist
    (zero padding outside the grid), the row masks including m_n. A tap's mask is one row mask & one column
    mask (_stencil_tap)."""
    return m_n & (b_row >= 1), m_n & (b_row < H - 1), b_col >= 1, b_col < W - 1


@triton.jit
def _stencil_tap(m_n, m_up, m_down, m_left, m_right, s_n, s_row, DI: tl.constexpr, DJ: tl.constexpr):
    """The grid neighbour (row + DI, col + DJ) of every token of a block: its mask [BN] (the precomputed row and
    column masks combined) and the scalar element offset (DI * W + DJ) * s_n of its rows from the tokens' own
    rows (s_row = W * s_n, int64), to add to the block's pointer tile: the neighbour of token n is n + DI * W + DJ
    wherever it exists. Where it does not, the lane is masked and its pointer (possibly outside the tensor) is
    never dereferenced."""
    m = m_n
    if DI < 0:
        m = m_up
    if DI > 0:
        m = m_down
    if DJ < 0:
        m = m & m_left
    if DJ > 0:
        m = m & m_right
    return m, DI * s_row + DJ * s_n


@triton.jit
def _la_fwd_out_kernel(
    p_q, p_v, p_g, p_w, p_bias, p_trig, p_kv, p_ksum, p_y, p_dy, p_dg, p_a, p_scale, p_o,
    N, H, W, n_pos,
    s_q_b, s_q_n, s_v_b, s_v_n, s_g_b, s_g_n, s_dy_b, s_dy_n, s_dg_b, s_dg_n, s_y_b, s_y_n,
    C: tl.constexpr, NUM_HEADS: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_N: tl.constexpr,
    EPS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_PAIRS: tl.constexpr,
    TRIG: tl.constexpr, GATE_GRAD: tl.constexpr, GATE_SILU: tl.constexpr, WRITE_A: tl.constexpr,
    A_OVER_DY: tl.constexpr, SCALE: tl.constexpr, WRITE_O: tl.constexpr,
):
    """y = ((q~ . kv) z + lepe(v)) * g for one block of tokens and one (batch, head). Grid (blocks, B * heads).

    GATE_SILU: p_g holds the gate's pre-activation and SiLU(g) gates instead. GATE_GRAD (the first pass of
    the gated backward): the same recomputation of o = (q~ . kv) z + lepe(v), then the gate gradient
    dg = dy * o (times SiLU'(g) with GATE_SILU) and the gated output gradient do = dy * gate are written to
    p_dg and p_y instead, and with WRITE_A the forward's gated output o * gate, rewritten to p_a (contiguous; the
    forward's rounding: a projection of the output, e.g. out_proj, takes its weight gradient from it). A_OVER_DY:
    p_a is p_dy (a written over dy in place): a barrier orders every thread's dy loads before the a stores,
    which may map the tile's elements to threads differently. SCALE: the output is scaled by p_scale[sample]
    (drop-path's per-sample factor): y * scale in the forward; in the backward, p_dy holds the scaled output's
    gradient, taken times the scale, and the rewritten a is scaled like the forward's y. WRITE_O (the forward):
    the pre-gate output o = (q~ . kv) z + lepe(v) is also written to p_o (contiguous), for a backward that takes
    the gate's gradients from it (``gate_grad_from_output``) instead of this pass."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // NUM_HEADS).to(tl.int64)
    i_h = i_bh % NUM_HEADS
    o_d = tl.arange(0, 32)
    o_n = i_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_row = o_n // W
    b_col = o_n % W
    o_c = i_h * 32 + o_d

    _, _, _, _, _, _, _, _, b_num, b_z = _attention_numerator(
        p_q + i_b * s_q_b + i_h * 32, s_q_n, p_trig, n_pos, p_kv, p_ksum, o_n, b_row, b_col, m_n, i_bh, i_h,
        C // 4, EPS, DOT_DTYPE, DOT_PRECISION, SPLIT_PAIRS, TRIG)
    # the LePE sums its taps in the loads' layout and meets the dot's output once (adding each tap to the dot's
    # accumulator would convert every tap's product to the MMA layout through shared memory)
    # one pointer tile of the tokens' own rows; each tap adds a scalar offset and combines precomputed masks
    o_n64 = o_n.to(tl.int64)
    p_vt = p_v + i_b * s_v_b + i_h * 32 + o_n64[:, None] * s_v_n + o_d[None, :]
    s_v_row = tl.cast(W, tl.int64) * s_v_n
    m_up, m_down, m_left, m_right = _stencil_masks(b_row, b_col, m_n, H, W)
    b_lepe = tl.zeros([BLOCK_N, 32], dtype=tl.float32)
    for k in tl.static_range(9):
        m_nb, o_nb = _stencil_tap(m_n, m_up, m_down, m_left, m_right, s_v_n, s_v_row, k // 3 - 1, k % 3 - 1)
        b_vn = tl.load(p_vt + o_nb, mask=m_nb[:, None], other=0.0)
        b_lepe += b_vn.to(tl.float32) * tl.load(p_w + k * C + o_c).to(tl.float32)[None, :]
    b_o = b_num * b_z[:, None] + (b_lepe + tl.load(p_bias + o_c).to(tl.float32)[None, :])
    p_yt = p_y + i_b * s_y_b + o_n64[:, None] * s_y_n + o_c[None, :]
    if WRITE_O:
        tl.store(p_o + i_b * N * C + o_n64[:, None] * C + o_c[None, :], b_o.to(p_o.dtype.element_ty),
                 mask=m_n[:, None])
    if SCALE:
        b_scale = tl.load(p_scale + i_b)
    if HAS_GATE:
        p_gt = p_g + i_b * s_g_b + o_n64[:, None] * s_g_n + o_c[None, :]
        b_g = tl.load(p_gt, mask=m_n[:, None], other=0.0).to(tl.float32)
        b_dgate = tl.full(b_g.shape, 1.0, tl.float32)  # d gate / d g
        if GATE_SILU:
            b_s = tl.sigmoid(b_g)
            b_dgate = b_s * (1.0 + b_g * (1.0 - b_s))
            b_g = b_g * b_s
        if GATE_GRAD:
            p_dyt = p_dy + i_b * s_dy_b + o_n64[:, None] * s_dy_n + o_c[None, :]
            b_dy = tl.load(p_dyt, mask=m_n[:, None], other=0.0).to(tl.float32)
            if SCALE:
                b_dy *= b_scale
            tl.store(p_dg + i_b * s_dg_b + o_n64[:, None] * s_dg_n + o_c[None, :],
                     (b_dy * b_o * b_dgate).to(p_dg.dtype.element_ty), mask=m_n[:, None])
            if WRITE_A:
                if A_OVER_DY:
                    tl.debug_barrier()
                b_a = b_o * b_g
                if SCALE:
                    b_a *= b_scale
                tl.store(p_a + i_b * N * C + o_n64[:, None] * C + o_c[None, :],
                         b_a.to(p_a.dtype.element_ty), mask=m_n[:, None])
            b_o = b_dy * b_g
        else:
            b_o *= b_g
    if SCALE and not GATE_GRAD:
        b_o *= b_scale
    tl.store(p_yt, b_o.to(p_y.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _la_gate_grad_kernel(
    p_dy, p_o, p_g, p_scale, p_dg, p_do, p_a, N, C,
    s_dy_b, s_dy_n, s_g_b, s_g_n, s_dg_b, s_dg_n, s_do_b, s_do_n,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, GATE_SILU: tl.constexpr, WRITE_A: tl.constexpr,
    SCALE: tl.constexpr,
):
    """The gate pass of the backward from the forward's saved pre-gate output o (contiguous), element-wise:
    dg = dy * o (times SiLU'(g) with GATE_SILU), do = dy * gate, and with WRITE_A the forward's gated output
    o * gate into p_a (contiguous; it may be p_dy itself: each element is read before it is written, by the same
    thread). SCALE: dy is the gradient of the output scaled by p_scale[sample], taken times the scale, and a is
    written scaled. Grid (token blocks, channel blocks, B)."""
    i_n, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (o_n < N)[:, None] & (o_c < C)[None, :]
    b_dy = tl.load(p_dy + i_b * s_dy_b + o_n[:, None] * s_dy_n + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_o = tl.load(p_o + i_b * N * C + o_n[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(p_g + i_b * s_g_b + o_n[:, None] * s_g_n + o_c[None, :], mask=m, other=0.0).to(tl.float32)
    b_dgate = tl.full(b_g.shape, 1.0, tl.float32)
    if GATE_SILU:
        b_s = tl.sigmoid(b_g)
        b_dgate = b_s * (1.0 + b_g * (1.0 - b_s))
        b_g = b_g * b_s
    if SCALE:
        b_scale = tl.load(p_scale + i_b)
        b_dy *= b_scale
    tl.store(p_dg + i_b * s_dg_b + o_n[:, None] * s_dg_n + o_c[None, :], (b_dy * b_o * b_dgate).to(
        p_dg.dtype.element_ty), mask=m)
    if WRITE_A:
        b_a = b_o * b_g
        if SCALE:
            b_a *= b_scale
        tl.store(p_a + i_b * N * C + o_n[:, None] * C + o_c[None, :], b_a.to(p_a.dtype.element_ty), mask=m)
    tl.store(p_do + i_b * s_do_b + o_n[:, None] * s_do_n + o_c[None, :], (b_dy * b_g).to(p_do.dtype.element_ty),
             mask=m)


@triton.jit
def _la_bwd_q_kernel(
    p_q, p_do, p_trig, p_kv, p_ksum, p_dq, p_dkv_part, p_dksum_part,
    N, W, n_pos, blocks_per_split,
    s_q_b, s_q_n, s_do_b, s_do_n, s_dq_b, s_dq_n, s_part,
    C: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK_N: tl.constexpr, EPS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_PAIRS: tl.constexpr, TRIG: tl.constexpr,
):
    """The q side of the backward, which needs only the forward's state and the gated output gradient do:
    per token dq; per program partial sums over its token range of
    dKV = sum_n z_n q~_n do_n^T and of the normaliser's sum_n u_n phi(q_n) (u_n = -z_n^2 num_n . do_n).
    Grid (splits, B * heads)."""
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // NUM_HEADS).to(tl.int64)
    i_h = i_bh % NUM_HEADS
    o_t = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, 32)
    o_p = tl.arange(0, 16)
    p_qh = p_q + i_b * s_q_b + i_h * 32
    p_dob = p_do + i_b * s_do_b + i_h * 32
    p_dqh = p_dq + i_b * s_dq_b + i_h * 32

    b_ks_a = tl.load(p_ksum + i_bh * 32 + o_p)
    b_ks_b = tl.load(p_ksum + i_bh * 32 + 16 + o_p)
    b_dkv_a = tl.zeros([16, 32], dtype=tl.float32)
    b_dkv_b = tl.zeros([16, 32], dtype=tl.float32)
    b_dks_a = tl.zeros([BLOCK_N, 16], dtype=tl.float32)  # element-wise: summed over tokens once, after the loop
    b_dks_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    blk_start = i_s * blocks_per_split
    blk_end = tl.minimum(blk_start + blocks_per_split, tl.cdiv(N, BLOCK_N))
    for i_blk in range(blk_start, blk_end):
        o_n = i_blk * BLOCK_N + o_t
        m_n = o_n < N
        o_n64 = o_n.to(tl.int64)
        b_qa, b_qb, _, _, b_qra, b_qrb, b_cos, b_sin, b_num, b_z = _attention_numerator(
            p_qh, s_q_n, p_trig, n_pos, p_kv, p_ksum, o_n, o_n // W, o_n % W, m_n, i_bh, i_h, C // 4, EPS,
            DOT_DTYPE, DOT_PRECISION, SPLIT_PAIRS, TRIG)
        b_do = tl.load(p_dob + o_n64[:, None] * s_do_n + o_d[None, :], mask=m_n[:, None], other=0.0).to(tl.float32)

        b_u = -b_z * b_z * tl.sum(b_num * b_do, axis=1)  # [BN]
        b_zdo = b_do * b_z[:, None]

        # dq: through q~ (z KV do, rotated back) and through z (u mean phi(k)), times ELU' = min(phi, 1)
        # (exactly _phi's derivative, recomputed rather than kept live); dq comes before the dKV/ds updates so
        # that cos, sin and the ELU' factors die before the dKV dots' operands are loaded
        b_kv_a, b_kv_b = _load_state(p_kv, i_bh)
        if DOT_DTYPE.is_fp32():
            b_dqra = tl.dot(b_zdo, tl.trans(b_kv_a), input_precision=DOT_PRECISION)  # [BN, 16]
            b_dqrb = tl.dot(b_zdo, tl.trans(b_kv_b), input_precision=DOT_PRECISION)
        else:  # low-precision operands: do (exact) and KV, z applied after (z do can pass fp16's range)
            b_dqra = _dot(b_do, tl.trans(b_kv_a), None, DOT_DTYPE, DOT_PRECISION) * b_z[:, None]
            b_dqrb = _dot(b_do, tl.trans(b_kv_b), None, DOT_DTYPE, DOT_PRECISION) * b_z[:, None]
        b_dqa = (b_dqra * b_cos + b_dqrb * b_sin + b_u[:, None] * b_ks_a[None, :]) * tl.minimum(b_qa, 1.0)
        b_dqb = (b_dqrb * b_cos - b_dqra * b_sin + b_u[:, None] * b_ks_b[None, :]) * tl.minimum(b_qb, 1.0)
        _store_pairs(p_dqh, o_n64 * s_dq_n, m_n, b_dqa, b_dqb, SPLIT_PAIRS)
        if DOT_DTYPE.is_fp32():
            b_dkv_a = tl.dot(tl.trans(b_qra), b_zdo, b_dkv_a, input_precision=DOT_PRECISION)
            b_dkv_b = tl.dot(tl.trans(b_qrb), b_zdo, b_dkv_b, input_precision=DOT_PRECISION)
        else:  # (z q~)^T do, do exact
            b_dkv_a = _dot(tl.trans(b_qra * b_z[:, None]), b_do, b_dkv_a, DOT_DTYPE, DOT_PRECISION)
            b_dkv_b = _dot(tl.trans(b_qrb * b_z[:, None]), b_do, b_dkv_b, DOT_DTYPE, DOT_PRECISION)
        b_dks_a += b_u[:, None] * b_qa
        b_dks_b += b_u[:, None] * b_qb

    o_row = i_s.to(tl.int64) * s_part  # this split's row of the partials buffer: dkv of every (b, h), then dksum
    _store_state(p_dkv_part, o_row + i_bh * 1024, b_dkv_a, b_dkv_b)
    tl.store(p_dksum_part + o_row + i_bh * 32 + o_p, tl.sum(b_dks_a, axis=0))
    tl.store(p_dksum_part + o_row + i_bh * 32 + 16 + o_p, tl.sum(b_dks_b, axis=0))


@triton.jit
def _la_bwd_kv_kernel(
    p_k, p_do, p_w, p_v, p_trig, p_dkv, p_dksum, p_dk, p_dv,
    N, H, W, n_pos, inv_n,
    s_k_b, s_k_n, s_v_b, s_v_n, s_do_b, s_do_n, s_dk_b, s_dk_n,
    C: tl.constexpr, NUM_HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_PAIRS: tl.constexpr, TRIG: tl.constexpr,
    ACC_DV: tl.constexpr, DK_OVER_K: tl.constexpr,
):
    """The k/v side of the backward for one block of tokens and one (batch, head): dk through k~ and
    mean phi(k), and dv through kv plus the transposed LePE stencil of do (the gated output gradient),
    added to p_dv's contents with ACC_DV (a gradient of v from elsewhere, summed in fp32 and rounded once).
    DK_OVER_K: p_dk is p_k (dk written over k in place): a barrier orders every thread's k loads before the dk
    stores. Grid (blocks, B * heads)."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // NUM_HEADS).to(tl.int64)
    i_h = i_bh % NUM_HEADS
    o_d = tl.arange(0, 32)
    o_p = tl.arange(0, 16)
    o_c = i_h * 32 + o_d
    o_n = i_blk * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_n64 = o_n.to(tl.int64)
    b_row = o_n // W
    b_col = o_n % W
    p_kh = p_k + i_b * s_k_b + i_h * 32
    p_dob = p_do + i_b * s_do_b + i_h * 32

    b_ka, b_kb = _load_pairs(p_kh, o_n64 * s_k_n, m_n, SPLIT_PAIRS)
    b_ka, b_eka = _phi(b_ka)
    b_kb, b_ekb = _phi(b_kb)
    b_cos, b_sin = _rope_cos_sin(b_row, b_col, p_trig, n_pos, i_h, C // 4, TRIG)
    b_v = tl.load(p_v + i_b * s_v_b + i_h * 32 + o_n64[:, None] * s_v_n + o_d[None, :], mask=m_n[:, None],
                  other=0.0).to(tl.float32)
    b_dkv_a, b_dkv_b = _load_state(p_dkv, i_bh)

    # dk = (R^T (dKV v) / N + dksum / N) * ELU'
    b_dkra = _dot(b_v, tl.trans(b_dkv_a), None, DOT_DTYPE, DOT_PRECISION) * inv_n  # [BN, 16]
    b_dkrb = _dot(b_v, tl.trans(b_dkv_b), None, DOT_DTYPE, DOT_PRECISION) * inv_n
    b_dks_a = tl.load(p_dksum + i_bh * 32 + o_p) * inv_n
    b_dks_b = tl.load(p_dksum + i_bh * 32 + 16 + o_p) * inv_n
    b_dka = (b_dkra * b_cos + b_dkrb * b_sin + b_dks_a[None, :]) * b_eka
    b_dkb = (b_dkrb * b_cos - b_dkra * b_sin + b_dks_b[None, :]) * b_ekb
    if DK_OVER_K:
        tl.debug_barrier()
    _store_pairs(p_dk + i_b * s_dk_b + i_h * 32, o_n64 * s_dk_n, m_n, b_dka, b_dkb, SPLIT_PAIRS)

    # dv = k~ dKV / N + sum_k w_k do_(n - off_k)
    b_kra = b_ka * b_cos - b_kb * b_sin
    b_krb = b_ka * b_sin + b_kb * b_cos
    b_dv = _dot(b_kra, b_dkv_a, None, DOT_DTYPE, DOT_PRECISION)
    b_dv = _dot(b_krb, b_dkv_b, b_dv, DOT_DTYPE, DOT_PRECISION) * inv_n  # [BN, 32]
    p_dot = p_dob + o_n64[:, None] * s_do_n + o_d[None, :]
    s_do_row = tl.cast(W, tl.int64) * s_do_n
    m_up, m_down, m_left, m_right = _stencil_masks(b_row, b_col, m_n, H, W)
    b_lepe = tl.zeros([BLOCK_N, 32], dtype=tl.float32)  # in the loads' layout, as in the forward
    for k in tl.static_range(9):
        m_src, o_src = _stencil_tap(m_n, m_up, m_down, m_left, m_right, s_do_n, s_do_row, 1 - k // 3, 1 - k % 3)
        b_do_src = tl.load(p_dot + o_src, mask=m_src[:, None], other=0.0)
        b_lepe += b_do_src.to(tl.float32) * tl.load(p_w + k * C + o_c).to(tl.float32)[None, :]
    b_dv += b_lepe
    p_dvt = p_dv + i_b * N * C + o_n64[:, None] * C + o_c[None, :]
    if ACC_DV:
        b_dv += tl.load(p_dvt, mask=m_n[:, None], other=0.0).to(tl.float32)
    tl.store(p_dvt, b_dv.to(p_dv.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _rope_table_kernel(p_trig, p_out, N, W, n_pos, C: tl.constexpr, BLOCK_N: tl.constexpr,
                       TRIG: tl.constexpr):
    """The cos/sin the kernels use, written as a (N, C/2, 2) table. Grid (blocks, heads)."""
    i_h = tl.program_id(1)
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_cos, b_sin = _rope_cos_sin(o_n // W, o_n % W, p_trig, n_pos, i_h, C // 4, TRIG)
    o_j = i_h * 16 + tl.arange(0, 16)
    p = p_out + o_n.to(tl.int64)[:, None] * C + 2 * o_j[None, :]
    tl.store(p, b_cos, mask=m_n[:, None])
    tl.store(p + 1, b_sin, mask=m_n[:, None])



# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocation of every kernel output (tests replace it with a NaN-filled allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.cache
def _pair_frequencies(C: int, device: torch.device) -> Tensor:
    """theta of each of the C/2 channel pairs (C/2,) fp32: pair j uses theta_(j mod C/4).

    ``reference.ops.rope_frequencies`` (the frequencies of the reference table and of the released
    checkpoints' ``rope.rotations`` buffers) rounded to fp32; the kernels' angle pos * theta is one fp32
    product, within fp32 rounding of the table's float64 angle.
    """
    theta = rope_frequencies(C).float()
    return torch.cat([theta, theta]).to(device)


@functools.cache
def _trig_table(n_pos: int, C: int, device: torch.device) -> Tensor:
    """cos/sin(pos * theta_j) (n_pos, C/4, 2) fp32, computed in float64 like ``reference.ops.rope_table``.

    Never evicted: a CUDA graph captured around the kernels keeps reading the table it saw at capture
    (a few hundred KB per grid size and channel count)."""
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * rope_frequencies(C)[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float().to(device)


def _trig_args(H: int, W: int, C: int, device: torch.device) -> tuple[Tensor, int, str]:
    """(pointer tensor, table length, TRIG) for the kernels' ``_rope_cos_sin``."""
    if CONFIG.trig == "table":
        n_pos = max(H, W)
        return _trig_table(n_pos, C, device), n_pos, CONFIG.trig
    # "reduced" is exact only below 2^16 turns (angles up to max(H, W) - 1 rad, theta_0 being 1)
    mode = "compute" if CONFIG.trig == "reduced" and max(H, W) > REDUCED_TRIG_MAX_POSITION else CONFIG.trig
    return _pair_frequencies(C, device), 1, mode


def _state_partials(n_split: int, bh: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One fp32 buffer for the per-split partials of a (d, d) matrix and a d-vector per (batch, head): row
    s holds split s's matrices of every (b, h), then its vectors. Returns (buffer, matrix view, vector view)."""
    part = _empty((n_split, bh * (HEAD_DIM + 1) * HEAD_DIM), torch.float32, device)
    return part, *part.split([bh * HEAD_DIM * HEAD_DIM, bh * HEAD_DIM], dim=1)


def _sum_state_partials(part: Tensor, bh: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The partials of ``_state_partials`` summed over splits, times scale: (bh, d, d) and (bh, d), fp32."""
    return tuple(reduce_partials(part, [((bh, HEAD_DIM, HEAD_DIM), torch.float32), ((bh, HEAD_DIM), torch.float32)],
                                 scale=scale))


def _splits(n_tokens: int, block_n: int, columns: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, blocks per split) for kernels that loop over token blocks: about
    programs_per_sm * SMs programs in all, fixed for a shape and device (so results are reproducible)."""
    return block_runs(triton.cdiv(n_tokens, block_n), CONFIG.programs_per_sm * multiprocessors(device) // columns)


def _taps_major(lepe_weight: Tensor) -> Tensor:
    """The (C, 1, 3, 3) LePE weight as a contiguous (9, C): each tap's C weights are one vector load."""
    return lepe_weight.reshape(lepe_weight.shape[0], 9).t().contiguous()


def _token_major(x: Tensor) -> Tensor:
    """x itself when its channels are contiguous (any batch/token strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _lowp_operands(dtype: torch.dtype) -> bool:
    """Whether the kernels' tl.dots take their operands rounded to the activation dtype (bf16/fp16)."""
    return dtype != torch.float32 and CONFIG.lowp_dot_precision == "lowp-operands"


def _dot_args(dtype: torch.dtype) -> dict:
    """The kernels' DOT_DTYPE (the dots' operand dtype) and DOT_PRECISION (tl.dot's input precision)."""
    if dtype == torch.float32:
        return {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}
    if _lowp_operands(dtype):
        return {"DOT_DTYPE": _TL_DTYPES[dtype], "DOT_PRECISION": "ieee"}
    return {"DOT_DTYPE": tl.float32, "DOT_PRECISION": CONFIG.lowp_dot_precision}


def _gate_args(g: Tensor | None, v: Tensor) -> tuple[Tensor, int, int]:
    """Pointer and strides for the gate; v stands in (never read) when there is no gate."""
    if g is None:
        return v, 0, 0
    return g, g.stride(0), g.stride(1)


def _split_launch(shape: torch.Size, W: int, num_heads: int, block_n: int, device: torch.device):
    """What a kernel looping over token ranges and writing per-split state partials is launched with:
    (trig, n_pos, TRIG, grid, blocks per split, partials buffer, its matrix view, its vector view)."""
    B, N, C = shape
    bh = B * num_heads
    trig, n_pos, trig_mode = _trig_args(N // W, W, C, device)
    n_split, per_split = _splits(N, block_n, bh, device)
    return trig, n_pos, trig_mode, (n_split, bh), per_split, *_state_partials(n_split, bh, device)


class Projected(NamedTuple):
    """k as the projection of the attention input, x W^T + b for x (B, N, C) (channels contiguous), W (C, C)
    and b (C,) or None in x's dtype, computed inside the forward's reduction kernel (``_k_pairs``) instead of
    read from a (B, N, C) tensor: ``attention_state`` takes one for k.

    Measured on an H100 (C=64, batch 2, 1024², bf16; session 12): projecting k there costs the reduction 0.03 ms
    and saves the k GEMM's 0.18 ms. The other kernels can take the same projection, but there it cost more than
    the GEMM it saves: the output pass (forward and gate pass) 1.86 -> 2.86 ms, the k/v backward 0.95 -> 1.38 ms
    (the q backward 0.77 -> 0.68 ms), 0.64 ms more per step in all; they read q and k from tensors."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None


def _k_args(t: Tensor | Projected) -> tuple[Tensor, Tensor, Tensor, dict]:
    """(pointer tensor, weight, bias, constexprs) of a kernel's k argument, a tensor or a ``Projected``;
    the tensor itself stands in (never read) for a missing weight or bias."""
    if not isinstance(t, Projected):
        return t, t, t, {"PROJECT": False, "HAS_PBIAS": False}
    weight = t.weight.contiguous()
    if weight.dtype != t.x.dtype or (t.bias is not None and t.bias.dtype != t.x.dtype):
        raise ValueError(f"the projection's weight and bias must be in its input's dtype {t.x.dtype}")
    bias = weight if t.bias is None else t.bias.contiguous()
    return t.x, weight, bias, {"PROJECT": True, "HAS_PBIAS": t.bias is not None}


def attention_state(k: Tensor | Projected, v: Tensor, W: int, num_heads: int) -> tuple[Tensor, Tensor]:
    """The forward's reduction: kv (B*h, 32, 32) = mean_m k~_m v_m^T and ksum (B*h, 32) = mean phi(k), fp32,
    from k (or its ``Projected``) and v (B, N, C) (channels contiguous)."""
    B, N, C = v.shape
    block_n = CONFIG.fwd_reduce_block_n
    trig, n_pos, trig_mode, grid, per_split, part, kv_part, ksum_part = _split_launch(
        v.shape, W, num_heads, block_n, v.device)
    k, wk, bk, proj = _k_args(k)
    _la_fwd_reduce_kernel[grid](
        k, wk, bk, v, trig, kv_part, ksum_part, N, W, n_pos, per_split,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), part.stride(0),
        C=C, NUM_HEADS=num_heads, BLOCK_N=block_n, **_dot_args(v.dtype),
        SPLIT_PAIRS=CONFIG.pair_loads == "split", TRIG=trig_mode, **proj, num_warps=CONFIG.fwd_reduce_warps,
        maxnreg=CONFIG.fwd_reduce_maxnreg or None,
    )
    return _sum_state_partials(part, B * num_heads, scale=1.0 / N)


def _linear_attention_fwd(qk: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor,
                          H: int, W: int, num_heads: int, gate_silu: bool, scale: Tensor | None = None,
                          o: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward: returns y (B, N, C) (times scale[b] for sample b with a (B,) fp32 scale) and the
    saved state kv (B*h, 32, 32), mean phi(k) (B*h, 32); the pre-gate output into o as ``attention_output``."""
    qk, v = _token_major(qk), _token_major(v)
    g = None if g is None else _token_major(g)
    C = v.shape[2]
    kv, ksum = attention_state(qk[..., C:], v, W, num_heads)
    y = attention_output(qk[..., :C], v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu, scale,
                         o=o)
    return y, kv, ksum


def attention_output(q: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor, kv: Tensor,
                     ksum: Tensor, H: int, W: int, num_heads: int, gate_silu: bool,
                     scale: Tensor | None = None, o: Tensor | None = None) -> Tensor:
    """The forward's output pass: y (B, N, C) from q, v, g (channels contiguous) and the state; times scale[b]
    for sample b when a (B,) fp32 scale is given. With o (B, N, C) contiguous in v's dtype, the pre-gate output
    is written into it as well (for ``gate_grad_from_output``)."""
    y = _empty(v.shape, v.dtype, v.device)
    _launch_out_pass(q, v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu, y, scale=scale, o=o)
    return y


def _launch_out_pass(q: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor, kv: Tensor,
                     ksum: Tensor, H: int, W: int, num_heads: int, gate_silu: bool, out: Tensor,
                     dy: Tensor | None = None, dg: Tensor | None = None, a: Tensor | None = None,
                     scale: Tensor | None = None, o: Tensor | None = None) -> None:
    """``_la_fwd_out_kernel`` over all tokens: y into out, or (dy and dg given) dg and do = dy * g into dg, out,
    and the forward's y again into a when given (a may be dy itself: y is written over it). With a (B,) fp32
    scale, y is scaled per sample, and dy is the gradient of the scaled y. With o (the forward), the pre-gate
    output into o as well."""
    B, N, C = v.shape
    trig, n_pos, trig_mode = _trig_args(H, W, C, v.device)
    g_arg, s_g_b, s_g_n = _gate_args(g, v)
    dy_arg = v if dy is None else dy
    dg_arg = out if dg is None else dg
    block_n = CONFIG.fwd_out_block_n
    _la_fwd_out_kernel[(triton.cdiv(N, block_n), B * num_heads)](
        q, v, g_arg, _taps_major(lepe_weight), lepe_bias.contiguous(), trig, kv, ksum, out, dy_arg,
        dg_arg, out if a is None else a, v if scale is None else scale, out if o is None else o, N, H, W, n_pos,
        q.stride(0), q.stride(1), v.stride(0), v.stride(1), s_g_b, s_g_n,
        dy_arg.stride(0), dy_arg.stride(1), dg_arg.stride(0), dg_arg.stride(1), out.stride(0), out.stride(1),
        C=C, NUM_HEADS=num_heads, HAS_GATE=g is not None, BLOCK_N=block_n, EPS=NORMALISER_EPS,
        **_dot_args(v.dtype), SPLIT_PAIRS=CONFIG.pair_loads == "split", TRIG=trig_mode,
        GATE_GRAD=dg is not None, GATE_SILU=gate_silu, WRITE_A=a is not None,
        A_OVER_DY=a is not None and dy is not None and a.data_ptr() == dy.data_ptr(), SCALE=scale is not None,
        WRITE_O=o is not None,
        num_warps=CONFIG.fwd_out_warps, maxnreg=CONFIG.fwd_out_maxnreg or None,
    )


def gated_output_grad(dy: Tensor, q: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor,
                      kv: Tensor, ksum: Tensor, H: int, W: int, num_heads: int, gate_silu: bool,
                      a: Tensor | None = None, dg: Tensor | None = None,
                      do: Tensor | None = None, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The backward's first pass: (do, dg), the gated output gradient do = dy * gate and the gate's gradient
    (recomputing the pre-gate output); without a gate (dy, an empty dg). With a (B, N, C) contiguous a, the
    forward's output y is written into it as well; with dg and do (B, N, C, channels contiguous), the gate's
    gradient and the gated output gradient are written into them. With a (B,) fp32 scale (a gate needed), the
    forward's output was scaled per sample: dy is the scaled output's gradient, and a is written scaled."""
    if g is None:
        if scale is not None:
            raise ValueError("scale: a per-sample output scale needs a gate")
        if a is not None:
            _launch_out_pass(q, v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu, a)
        return dy, _empty((0,), v.dtype, v.device)
    dg = _empty(v.shape, v.dtype, v.device) if dg is None else dg
    do = _empty(v.shape, v.dtype, v.device) if do is None else do
    _launch_out_pass(q, v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu, do, dy=dy, dg=dg, a=a,
                     scale=scale)
    return do, dg


# The element-wise gate pass's tile: GATE_BLOCK_N tokens by GATE_BLOCK_C channels (at most) on GATE_WARPS warps,
# 16 elements a thread (compiled offline for sm_90 at C=64, bf16: 64 registers; 137 on 4 warps, 32 a thread).
GATE_BLOCK_N, GATE_BLOCK_C, GATE_WARPS = 64, 64, 8


def gate_grad_from_output(dy: Tensor, o: Tensor, g: Tensor, gate_silu: bool, a: Tensor | None = None,
                          dg: Tensor | None = None, do: Tensor | None = None,
                          scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``gated_output_grad``'s (do, dg) from the forward's pre-gate output o (B, N, C) contiguous, saved by
    ``attention_output``, element-wise instead of recomputing o from q, v and the state; a, dg, do and scale as
    there (a gate needed). a, when given, is the forward's gated output recomputed from the saved o: bitwise the
    forward's for fp32 activations, within a rounding of o for bf16/fp16 ones."""
    B, N, C = o.shape
    dg = _empty(o.shape, o.dtype, o.device) if dg is None else dg
    do = _empty(o.shape, o.dtype, o.device) if do is None else do
    block_c = min(GATE_BLOCK_C, triton.next_power_of_2(C))
    _la_gate_grad_kernel[(triton.cdiv(N, GATE_BLOCK_N), triton.cdiv(C, block_c), B)](
        dy, o, g, o if scale is None else scale, dg, do, o if a is None else a, N, C,
        dy.stride(0), dy.stride(1), g.stride(0), g.stride(1), dg.stride(0), dg.stride(1), do.stride(0), do.stride(1),
        BLOCK_N=GATE_BLOCK_N, BLOCK_C=block_c, GATE_SILU=gate_silu, WRITE_A=a is not None, SCALE=scale is not None,
        num_warps=GATE_WARPS,
    )
    return do, dg


def q_side_grad(do: Tensor, q: Tensor, kv: Tensor, ksum: Tensor, W: int, num_heads: int,
                dq: Tensor) -> tuple[Tensor, Tensor, float]:
    """The q side of the backward: dq into dq (B, N, C; channels contiguous); returns the state's gradient
    (dkv (B*h, 32, 32), dksum (B*h, 32)) and the scale the k/v side applies to it."""
    B, N, C = do.shape
    bh = B * num_heads
    block_n = CONFIG.bwd_q_block_n
    trig, n_pos, trig_mode, grid, per_split, part, dkv_part, dksum_part = _split_launch(
        do.shape, W, num_heads, block_n, do.device)
    _la_bwd_q_kernel[grid](
        q, do, trig, kv, ksum, dq, dkv_part, dksum_part, N, W, n_pos, per_split,
        q.stride(0), q.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), part.stride(0),
        C=C, NUM_HEADS=num_heads, BLOCK_N=block_n, EPS=NORMALISER_EPS,
        **_dot_args(do.dtype), SPLIT_PAIRS=CONFIG.pair_loads == "split", TRIG=trig_mode,
        num_warps=CONFIG.bwd_q_warps, maxnreg=CONFIG.bwd_q_maxnreg or None,
    )
    # the k/v kernel scales dKV and ds by 1/N; low-precision operands take them as means instead (dKV, a sum
    # over N tokens, can pass fp16's range where its mean does not)
    if _lowp_operands(do.dtype):
        dkv, dksum = _sum_state_partials(part, bh, scale=1.0 / N)
        return dkv, dksum, 1.0
    dkv, dksum = _sum_state_partials(part, bh)
    return dkv, dksum, 1.0 / N


def kv_side_grad(do: Tensor, k: Tensor, v: Tensor, lepe_weight: Tensor, dkv: Tensor, dksum: Tensor, inv_n: float,
                 H: int, W: int, num_heads: int, dk: Tensor, dv: Tensor, accumulate: bool = False) -> None:
    """The k/v side of the backward: dk into dk (which may be k itself: dk is written over it), and dv (through
    kv and the transposed LePE) into dv (B, N, C, contiguous), added to dv's contents when accumulate."""
    B, N, C = v.shape
    trig, n_pos, trig_mode = _trig_args(H, W, C, v.device)
    block_n = CONFIG.bwd_kv_block_n
    _la_bwd_kv_kernel[(triton.cdiv(N, block_n), B * num_heads)](
        k, do, _taps_major(lepe_weight), v, trig, dkv, dksum, dk, dv, N, H, W, n_pos, inv_n,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0), dk.stride(1),
        C=C, NUM_HEADS=num_heads, BLOCK_N=block_n, **_dot_args(v.dtype),
        SPLIT_PAIRS=CONFIG.pair_loads == "split", TRIG=trig_mode, ACC_DV=accumulate,
        DK_OVER_K=dk.data_ptr() == k.data_ptr(), num_warps=CONFIG.bwd_kv_warps,
        maxnreg=CONFIG.bwd_kv_maxnreg or None,
    )


def lepe_param_grads(do: Tensor, v: Tensor, lepe_weight: Tensor, lepe_bias: Tensor, H: int,
                     W: int) -> tuple[Tensor, Tensor]:
    """The LePE's parameter gradients (C, 1, 3, 3) and (C,) in their parameters' dtypes, reduced like the
    stencils'."""
    dw, db = depthwise_param_grads(do, v, (H, W))
    return dw.reshape(v.shape[2], 1, 3, 3).to(lepe_weight.dtype), db.to(lepe_bias.dtype)


def _linear_attention_bwd(dy: Tensor, qk: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor,
                          lepe_bias: Tensor, kv: Tensor, ksum: Tensor, H: int, W: int, num_heads: int,
                          gate_silu: bool, a: Tensor | None = None, dg: Tensor | None = None,
                          do: Tensor | None = None, scale: Tensor | None = None,
                          o: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the backward: returns dqk (B, N, 2C), dv (B, N, C), dg (B, N, C; empty when g is None),
    d lepe_weight (C, 1, 3, 3) and d lepe_bias (C,) in their parameters' dtypes; the forward's output is
    rewritten into a (B, N, C) contiguous a when given, and dg and the gated output gradient do (a work tensor of
    the backward) are written into the (B, N, C) tensors dg and do (channels contiguous) when given; scale as
    for ``gated_output_grad``. With the forward's pre-gate output o (a gate needed), the gate pass is
    ``gate_grad_from_output``'s."""
    dy, qk, v = _token_major(dy), _token_major(qk), _token_major(v)
    g = None if g is None else _token_major(g)
    B, N, C = v.shape
    q, k = qk[..., :C], qk[..., C:]
    dqk = _empty((B, N, 2 * C), qk.dtype, v.device)
    dv = _empty((B, N, C), v.dtype, v.device)
    if o is not None:
        do, dg = gate_grad_from_output(dy, o, g, gate_silu, a=a, dg=dg, do=do, scale=scale)
    else:
        do, dg = gated_output_grad(dy, q, v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu, a=a,
                                   dg=dg, do=do, scale=scale)
    dkv, dksum, inv_n = q_side_grad(do, q, kv, ksum, W, num_heads, dqk[..., :C])
    dw, db = lepe_param_grads(do, v, lepe_weight, lepe_bias, H, W)
    kv_side_grad(do, k, v, lepe_weight, dkv, dksum, inv_n, H, W, num_heads, dqk[..., C:], dv)
    return dqk, dv, dg, dw, db


# ----------------------------------------------------------------------------------------------
# torch custom ops and autograd
# ----------------------------------------------------------------------------------------------

_FWD_SCHEMA = "(Tensor qk, Tensor v, Tensor? g, Tensor lepe_weight, Tensor lepe_bias, SymInt H, SymInt W, " \
    "int num_heads, bool gate_silu) -> (Tensor, Tensor, Tensor)"
_BWD_SCHEMA = "(Tensor dy, Tensor qk, Tensor v, Tensor? g, Tensor lepe_weight, Tensor lepe_bias, Tensor kv, " \
    "Tensor ksum, SymInt H, SymInt W, int num_heads, bool gate_silu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"

linear_attention_fwd_op = torch.library.custom_op(
    "mlla_fast::linear_attention_fwd", _linear_attention_fwd, mutates_args=(), schema=_FWD_SCHEMA)
linear_attention_bwd_op = torch.library.custom_op(
    "mlla_fast::linear_attention_bwd", _linear_attention_bwd, mutates_args=(), schema=_BWD_SCHEMA)


def fake_fwd_outputs(v: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Empty stand-ins shaped like the forward's (y, kv, ksum) for v (B, N, C): for fake (meta) implementations."""
    B, N, C = v.shape
    state = v.new_empty((B * num_heads, HEAD_DIM, HEAD_DIM), dtype=torch.float32)
    return v.new_empty((B, N, C)), state, v.new_empty((B * num_heads, HEAD_DIM), dtype=torch.float32)


def fake_bwd_outputs(qk_dtype: torch.dtype, v: Tensor, g: Tensor | None, lepe_weight: Tensor,
                     lepe_bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Empty stand-ins shaped like the backward's (dqk, dv, dg, d lepe_weight, d lepe_bias), dqk in qk_dtype."""
    B, N, C = v.shape
    dg = v.new_empty((B, N, C) if g is not None else (0,))
    return (v.new_empty((B, N, 2 * C), dtype=qk_dtype), v.new_empty((B, N, C)), dg,
            lepe_weight.new_empty(lepe_weight.shape), lepe_bias.new_empty(lepe_bias.shape))


@linear_attention_fwd_op.register_fake
def _(qk, v, g, lepe_weight, lepe_bias, H, W, num_heads, gate_silu):
    return fake_fwd_outputs(v, num_heads)


@linear_attention_bwd_op.register_fake
def _(dy, qk, v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu):
    return fake_bwd_outputs(qk.dtype, v, g, lepe_weight, lepe_bias)


def _setup_context(ctx, inputs, output):
    qk, v, g, lepe_weight, lepe_bias, H, W, num_heads, gate_silu = inputs
    _, kv, ksum = output
    ctx.save_for_backward(qk, v, g, lepe_weight, lepe_bias, kv, ksum)
    ctx.grid = (H, W, num_heads, gate_silu)
    ctx.set_materialize_grads(False)  # kv and ksum take no gradient: no zero-filled tensors for them


def _backward(ctx, dy, _dkv, _dksum):
    if dy is None:  # the output took no gradient
        return None, None, None, None, None, None, None, None, None
    qk, v, g, lepe_weight, lepe_bias, kv, ksum = ctx.saved_tensors
    dqk, dv, dg, dw, db = linear_attention_bwd_op(dy, qk, v, g, lepe_weight, lepe_bias, kv, ksum, *ctx.grid)
    return dqk, dv, (dg if g is not None else None), dw, db, None, None, None, None


linear_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------


def _check_inputs(qk: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor,
                  hw: tuple[int, int], num_heads: int) -> tuple[int, int]:
    """Raise ValueError unless the arguments are what the kernels handle; returns (H, W)."""
    named = {"qk": qk, "v": v, "g": g, "lepe_weight": lepe_weight, "lepe_bias": lepe_bias}
    for name, t in named.items():
        if not isinstance(t, Tensor) and not (name == "g" and t is None):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if v.dim() != 3:
        raise ValueError(f"v: expected a 3-D (B, N, C) token tensor, got shape {tuple(v.shape)}")
    B, N, C = v.shape
    if (not isinstance(hw, (tuple, list, torch.Size)) or len(hw) != 2
            or not all(isinstance(s, (int, torch.SymInt)) and s >= 1 for s in hw)):
        raise ValueError(f"hw: expected a pair of positive ints (H, W), got {hw!r}")
    H, W = int(hw[0]), int(hw[1])
    if H * W != N:
        raise ValueError(f"v: token count {N} does not match the grid {H}x{W} (expected {H * W} tokens)")
    if N > MAX_TOKENS:
        raise ValueError(f"v: expected at most {MAX_TOKENS} tokens per image, got {N}")
    if B < 1:
        raise ValueError(f"v: expected a batch of at least 1, got {B}")
    if C % HEAD_DIM:
        raise ValueError(f"v: expected a channel count that is a multiple of {HEAD_DIM}, got {C}")
    if not isinstance(num_heads, int) or num_heads * HEAD_DIM != C:
        raise ValueError(f"num_heads: expected C / {HEAD_DIM} = {C // HEAD_DIM} heads of {HEAD_DIM} channels "
                         f"for C = {C}, got {num_heads!r}")
    if tuple(qk.shape) != (B, N, 2 * C):
        raise ValueError(f"qk: expected shape {(B, N, 2 * C)} (q and k of v's {C} channels), got {tuple(qk.shape)}")
    if g is not None and tuple(g.shape) != (B, N, C):
        raise ValueError(f"g: expected shape {(B, N, C)} like v, got {tuple(g.shape)}")
    if tuple(lepe_weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"lepe_weight: expected shape {(C, 1, 3, 3)}, got {tuple(lepe_weight.shape)}")
    if tuple(lepe_bias.shape) != (C,):
        raise ValueError(f"lepe_bias: expected shape {(C,)}, got {tuple(lepe_bias.shape)}")
    if v.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"v: expected one of {ACTIVATION_DTYPES}, got {v.dtype}")
    for name in ("qk", "g"):
        if named[name] is not None and named[name].dtype != v.dtype:
            raise ValueError(f"{name}: expected the activation dtype of v ({v.dtype}), got {named[name].dtype}")
    for name in ("lepe_weight", "lepe_bias"):
        if named[name].dtype not in (torch.float32, v.dtype):
            raise ValueError(f"{name}: expected float32 or the activation dtype {v.dtype}, got {named[name].dtype}")
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"expected all tensors on one device, got {devices}")
    if v.device.type != "cuda" and not (v.device.type == "cpu" and interpreter_enabled()):
        raise ValueError(f"expected CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {v.device}")
    return H, W


def linear_attention(qk: Tensor, v: Tensor, g: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor,
                     hw: tuple[int, int], num_heads: int, gate_silu: bool = False) -> Tensor:
    """Fused MLLA linear attention with LePE and gate: ``(attention(v) + lepe(v)) * g``.

    Same arguments and result as ``reference.ops.linear_attention_ref`` (with the RoPE table of the
    grid): phi = ELU + 1 on q and k, 2-D RoPE over the whole C (angles computed in the kernel),
    per 32-channel head ``out_n = (RoPE(phi(q_n)) . kv) z_n`` with ``kv = sum_m RoPE(phi(k_m)) v_m^T / N``
    and ``z_n = 1 / (phi(q_n) . mean_m phi(k_m) + 1e-6)``, plus the 3x3 depthwise LePE of v, times g.
    Differentiable in qk, v, g, lepe_weight and lepe_bias; a torch custom op (``mlla_fast::linear_attention_fwd``
    and ``_bwd``), so torch.compile traces around it. fp32 accumulation; outputs in the activation dtype.

    Args:
        qk: (B, N, 2C) the qk projection of v: q is channels [0, C), k channels [C, 2C).
        v: (B, N, C) the attention input; qk, v and g share one dtype (float32, bfloat16 or float16).
            Token and batch strides are free; channels must be contiguous (otherwise copied).
        g: (B, N, C) gate, or None for no gating.
        lepe_weight, lepe_bias: (C, 1, 3, 3) and (C,), float32 or the activation dtype.
        hw: the grid (H, W), H * W = N, row-major tokens.
        num_heads: C / 32 (heads of 32 channels).
        gate_silu: g is the gate's pre-activation; SiLU(g) gates (computed in the kernels, so the block
            keeps no separate gate activation for its backward).

    Returns:
        (B, N, C) in the activation dtype.
    """
    H, W = _check_inputs(qk, v, g, lepe_weight, lepe_bias, hw, num_heads)
    y, _, _ = linear_attention_fwd_op(qk, v, g, lepe_weight, lepe_bias, H, W, num_heads, bool(gate_silu))
    return y


def rope_cos_sin(H: int, W: int, C: int, device: torch.device | str) -> Tensor:
    """The kernels' RoPE cos/sin (H, W, C/2, 2) fp32, for checking them against ``reference.ops.rope_table``."""
    if C % HEAD_DIM or H < 1 or W < 1:
        raise ValueError(f"expected H, W >= 1 and C a multiple of {HEAD_DIM}, got H={H}, W={W}, C={C}")
    device = torch.device(device)
    out = _empty((H * W, C // 2, 2), torch.float32, device)
    block_n = 64
    trig, n_pos, trig_mode = _trig_args(H, W, C, device)
    _rope_table_kernel[(triton.cdiv(H * W, block_n), C // HEAD_DIM)](
        trig, out, H * W, W, n_pos, C=C, BLOCK_N=block_n, TRIG=trig_mode)
    return out.reshape(H, W, C // 2, 2)


__all__ = ["CONFIG", "LinearAttentionConfig", "linear_attention", "rope_cos_sin"]
