"""EDSM (PatchMerging), EUSM (PatchExpand) and the final x4 expand on token-major data.

The reference ops (``reference/ops.py``) move every activation to the (B, C, H, W) image view and
back; here the tensors stay token-major (B, N, C) throughout and the grid arithmetic lives inside
three Triton kernels:

- ``dwconv_stride2_relu``: ReLU(depthwise 3x3 conv, stride 2, padding 1, + bias) from the (H, W)
  grid to the (ceil(H/2), ceil(W/2)) grid. Output pixel (y, x) reads input (2y - 1 + ky, 2x - 1 + kx).
- ``dwconv_transpose2x``: depthwise ConvTranspose2d (kernel 3, stride 2, padding 1, output_padding 1,
  no bias) from (H, W) to (2H, 2W). Input (i, j) scatters to (2i - 1 + ky, 2j - 1 + kx), so output
  (y, x) gathers input ((y + 1 - ky) / 2, (x + 1 - kx) / 2) wherever that is an integer in range.
- ``pixel_shuffle4_layernorm``: LayerNorm of the (B, H*W, 16C) expand output read as 4x4 patches of
  C channels, written straight in the (4H, 4W) row-major token order.

The two stencils are adjoint to each other: the input gradient of the stride-2 conv is a
transposed-conv gather of the output gradient, and the input gradient of the transposed conv is a
stride-2 gather. So there are two stencil kernels, one that runs over the small grid and gathers
from the big one (``_down_kernel``) and one that runs over the big grid and gathers from the small
one (``_up_kernel``, its programs split by the parity class of the big pixels, so that each evaluates
only the 1, 2 or 4 taps that reach the small grid); each serves one op's forward and the other op's
backward. In a backward launch the same program also forms the depthwise weight (and bias) gradient
from the values it has loaded, accumulating over its tokens in fp32 registers and writing one fp32
partial per program; the partials are summed by ``torch.sum`` (no atomics, deterministic).

``input_relu=True`` makes a stencil consume ReLU(x) instead of x (and mask its input gradient by
x > 0): the composed ops use it to fuse the ReLU after the 1x1 expand GEMM into the stencil, so the
largest activation of each op is read once and never rewritten.

Each Triton op is a pair of ``torch.library`` custom ops (forward and backward, with fake
implementations, so ``torch.compile`` traces around them) called from a ``torch.autograd.Function``.
The 1x1 convolutions are GEMMs on tokens (``mlla_fast.linear`` on the (out, in) view of the weight) and
BatchNorm runs on the (B*N, C) token matrix (kernels/batch_norm.py, or ``F.batch_norm`` off the fused path),
neither with a permute; EUSM's closing LayerNorm is the token LayerNorm of ``kernels/layer_norm.py``.
``image_batch_norm`` runs the same token BatchNorm, with an optional fused ReLU, on a channels-last image (the
stem's conv -> BatchNorm -> ReLU layers, ``mlla_fast.layers.Stem``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from ..backend import fused_supported, multiprocessors
from ..casts import cast
from ..linear import chunk_ranges, compute_dtype, linear, matmul_to
from ..reference.ops import check_tokens
from ..reference.sampling import TokenSampler
from .batch_norm import BatchNormTokensFunction
from .layer_norm import layer_norm, returns_fp32

__all__ = [
    "dwconv_stride2_relu",
    "dwconv_transpose2x",
    "final_expand",
    "final_head",
    "image_batch_norm",
    "module_args",
    "patch_expand",
    "patch_merging",
    "pixel_shuffle4_layernorm",
]


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


# Grid sizes vary from call to call: not specialised on (so not recompiled for) their divisibility.
_GRID_ARGS = ["n_out", "Hs", "Ws", "Hb", "Wb", "tiles_per_prog", "num_progs"]


@triton.jit
def _down_tap(acc, a_k, tile, KY: tl.constexpr, KX: tl.constexpr, BIG_PRE_RELU: tl.constexpr,
              WEIGHT_GRAD: tl.constexpr):
    """Tap (KY, KX) of ``_down_kernel``'s gather: v = [ReLU](big) at big pixels (2y - 1 + KY, 2x - 1 + KX)
    (zero outside the grid). Returns acc + w[tap] * v and a_k + small * v (a_k unchanged without WEIGHT_GRAD).

    tile = (small [BN, BC] fp32, big_ptr, w_ptr, o_b, o_y, o_x, m_n [BN], o_c, m_c [BC], Hb, Wb, C).
    """
    b_small, big_ptr, w_ptr, o_b, o_y, o_x, m_n, o_c, m_c, Hb, Wb, C = tile
    o_iy = 2 * o_y - 1 + KY
    o_ix = 2 * o_x - 1 + KX
    m_t = m_n & (o_iy >= 0) & (o_iy < Hb) & (o_ix >= 0) & (o_ix < Wb)
    p_big = big_ptr + ((o_b * Hb + o_iy) * Wb + o_ix)[:, None] * C + o_c[None, :]
    b_v = tl.load(p_big, mask=m_t[:, None] & m_c[None, :], other=0.0).to(tl.float32)  # [BN, BC]
    if BIG_PRE_RELU:
        b_v = tl.maximum(b_v, 0.0)
    b_w = tl.load(w_ptr + o_c * 9 + (KY * 3 + KX), mask=m_c, other=0.0).to(tl.float32)  # [BC]
    acc += b_v * b_w[None, :]
    if WEIGHT_GRAD:
        a_k += b_small * b_v
    return acc, a_k


@triton.jit
def _store_tap_partials(p_part, C, m_c, a0, a1, a2, a3, a4, a5, a6, a7, a8):
    """Write rows 0..8 of one program's (N_PART, C) partial at p_part (+ o_c): tap k's accumulator a_k summed
    over tokens."""
    tl.store(p_part + 0 * C, tl.sum(a0, axis=0), mask=m_c)
    tl.store(p_part + 1 * C, tl.sum(a1, axis=0), mask=m_c)
    tl.store(p_part + 2 * C, tl.sum(a2, axis=0), mask=m_c)
    tl.store(p_part + 3 * C, tl.sum(a3, axis=0), mask=m_c)
    tl.store(p_part + 4 * C, tl.sum(a4, axis=0), mask=m_c)
    tl.store(p_part + 5 * C, tl.sum(a5, axis=0), mask=m_c)
    tl.store(p_part + 6 * C, tl.sum(a6, axis=0), mask=m_c)
    tl.store(p_part + 7 * C, tl.sum(a7, axis=0), mask=m_c)
    tl.store(p_part + 8 * C, tl.sum(a8, axis=0), mask=m_c)


@triton.jit(do_not_specialize=_GRID_ARGS)
def _down_kernel(
    big_ptr, small_ptr, w_ptr, bias_ptr, out_ptr, part_ptr,
    n_out, Hs, Ws, Hb, Wb, C, tiles_per_prog, num_progs,
    BIG_PRE_RELU: tl.constexpr, SMALL_PRE_RELU: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_RELU: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, N_PART: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs over small-grid tokens (flattened over the batch); small pixel (y, x) gathers big pixels
    (2y - 1 + ky, 2x - 1 + kx).

    Forward of the stride-2 conv: big = x, out = [ReLU](sum_tap w * [ReLU](big) + bias).
    Backward of the transposed conv (WEIGHT_GRAD): big = grad_out, small = x, out = grad_x (masked by
    x > 0 when SMALL_PRE_RELU), partial[pid, tap] = sum over the program's tokens of [ReLU](x) * big[tap].
    The products are accumulated element-wise over the program's tiles (one [BLOCK_N, BLOCK_C] fp32
    accumulator per tap) and summed over tokens once at the end: a cross-warp reduction per tile would
    dominate the kernel's time.
    """
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    n_small = Hs * Ws
    zero = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    a0, a1, a2, a3, a4, a5, a6, a7, a8 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for i in range(tiles_per_prog):
        o_t = (pid_n + i * num_progs).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] small tokens
        m_n = o_t < n_out
        o_b = o_t // n_small
        o_s = o_t - o_b * n_small
        o_y = o_s // Ws
        o_x = o_s - o_y * Ws
        m = m_n[:, None] & m_c[None, :]
        p_out = o_t[:, None] * C + o_c[None, :]
        b_s = zero
        b_small = zero
        if WEIGHT_GRAD:
            b_s = tl.load(small_ptr + p_out, mask=m, other=0.0).to(tl.float32)
            b_small = b_s
            if SMALL_PRE_RELU:
                b_small = tl.maximum(b_s, 0.0)
        tile = (b_small, big_ptr, w_ptr, o_b, o_y, o_x, m_n, o_c, m_c, Hb, Wb, C)
        acc = zero
        acc, a0 = _down_tap(acc, a0, tile, 0, 0, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a1 = _down_tap(acc, a1, tile, 0, 1, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a2 = _down_tap(acc, a2, tile, 0, 2, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a3 = _down_tap(acc, a3, tile, 1, 0, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a4 = _down_tap(acc, a4, tile, 1, 1, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a5 = _down_tap(acc, a5, tile, 1, 2, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a6 = _down_tap(acc, a6, tile, 2, 0, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a7 = _down_tap(acc, a7, tile, 2, 1, BIG_PRE_RELU, WEIGHT_GRAD)
        acc, a8 = _down_tap(acc, a8, tile, 2, 2, BIG_PRE_RELU, WEIGHT_GRAD)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
        if OUT_RELU:
            acc = tl.maximum(acc, 0.0)
        if WEIGHT_GRAD and SMALL_PRE_RELU:
            acc = tl.where(b_s > 0.0, acc, 0.0)
        tl.store(out_ptr + p_out, acc.to(out_ptr.dtype.element_ty), mask=m)
    if WEIGHT_GRAD:
        p_part = part_ptr + pid_n.to(tl.int64) * (N_PART * C) + o_c
        _store_tap_partials(p_part, C, m_c, a0, a1, a2, a3, a4, a5, a6, a7, a8)


@triton.jit
def _up_tap(acc, a_k, a_bias, tile, KY: tl.constexpr, KX: tl.constexpr, SMALL_PRE_RELU: tl.constexpr,
            GRAD_MASK: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr):
    """Tap (KY, KX) of ``_up_kernel``'s gather for a tile of one parity class, where the tap is valid: big pixel
    (2i + PY, 2j + PX) reads small pixel (i + [KY == 0], j + [KX == 0]) (zero past the small grid's last row or
    column). v = [ReLU](small) there, zeroed where mask <= 0 (GRAD_MASK). Returns acc + w[tap] * v,
    a_k + big * v (WEIGHT_GRAD) and, at the centre tap, a_bias + v (BIAS_GRAD); the accumulators not updated
    are returned unchanged.

    tile = (big [BN, BC] fp32, small_ptr, mask_ptr, w_ptr, o_s [BN] small token (i, j), o_i, o_j, m_n [BN],
    o_c, m_c [BC], Hs, Ws, C).
    """
    b_big, small_ptr, mask_ptr, w_ptr, o_s, o_i, o_j, m_n, o_c, m_c, Hs, Ws, C = tile
    m_t = m_n
    o_src = o_s
    if KY == 0:
        m_t = m_t & (o_i + 1 < Hs)
        o_src += Ws
    if KX == 0:
        m_t = m_t & (o_j + 1 < Ws)
        o_src += 1
    m_v = m_t[:, None] & m_c[None, :]
    p_small = o_src[:, None] * C + o_c[None, :]
    b_v = tl.load(small_ptr + p_small, mask=m_v, other=0.0).to(tl.float32)  # [BN, BC]
    if SMALL_PRE_RELU:
        b_v = tl.maximum(b_v, 0.0)
    if GRAD_MASK:
        b_m = tl.load(mask_ptr + p_small, mask=m_v, other=0.0)
        b_v = tl.where(b_m > 0, b_v, 0.0)
    b_w = tl.load(w_ptr + o_c * 9 + (KY * 3 + KX), mask=m_c, other=0.0).to(tl.float32)  # [BC]
    acc += b_v * b_w[None, :]
    if WEIGHT_GRAD:
        a_k += b_big * b_v
        if BIAS_GRAD and KY == 1 and KX == 1:
            a_bias += b_v
    return acc, a_k, a_bias


@triton.jit
def _up_class(
    small_ptr, mask_ptr, big_ptr, w_ptr, out_ptr, part_ptr, pid_n,
    n_out, Hs, Ws, Hb, Wb, C, tiles_per_prog, num_progs,
    PY: tl.constexpr, PX: tl.constexpr, SMALL_PRE_RELU: tl.constexpr, GRAD_MASK: tl.constexpr,
    BIG_PRE_RELU: tl.constexpr, WEIGHT_GRAD: tl.constexpr, N_PART: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``_up_kernel`` over the big pixels (2i + PY, 2j + PX) of parity class (PY, PX), token tiles
    pid_n, pid_n + num_progs, ... of the class's (B, Hc, Wc) grid. Only the taps (ky, kx) with ky = 1 (PY = 0)
    or ky in {0, 2} (PY = 1), and likewise kx for PX, reach a small pixel: 1, 2, 2 or 4 taps, taps
    (KY0 + 2t, KX0 + 2u) with KY0 = 1 - PY, KX0 = 1 - PX, accumulated in tap order into a0 (t = u = 0),
    a1 (u = 1), a2 (t = 1) and a3 (t = u = 1). Each tap belongs to exactly one class, so the program writes
    the partial rows of its class's taps (and the bias row for class (0, 0)) and no others.
    """
    BIAS_GRAD: tl.constexpr = N_PART == 10
    KY0: tl.constexpr = 1 - PY
    KX0: tl.constexpr = 1 - PX
    o_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    n_img = Hb * Wb
    Hc = (Hb + 1 - PY) // 2  # class rows i with 2i + PY < Hb; Hc <= Hs
    Wc = (Wb + 1 - PX) // 2
    n_cls_img = Hc * Wc
    n_cls = (n_out // n_img) * n_cls_img
    n_cls_img = tl.maximum(n_cls_img, 1)  # an empty class (Hb or Wb = 1): every lane masked off
    Wc = tl.maximum(Wc, 1)
    zero = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    a0, a1, a2, a3, a_bias = zero, zero, zero, zero, zero
    for it in range(tiles_per_prog):
        o_t = (pid_n + it * num_progs).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] class tokens
        m_n = o_t < n_cls
        o_b = o_t // n_cls_img
        o_r = o_t - o_b * n_cls_img
        o_i = o_r // Wc
        o_j = o_r - o_i * Wc
        o_s = (o_b * Hs + o_i) * Ws + o_j  # small pixel (i, j)
        m = m_n[:, None] & m_c[None, :]
        p_out = ((o_b * Hb + 2 * o_i + PY) * Wb + 2 * o_j + PX)[:, None] * C + o_c[None, :]
        b_g = zero
        b_big = zero
        if WEIGHT_GRAD:
            b_g = tl.load(big_ptr + p_out, mask=m, other=0.0).to(tl.float32)
            b_big = b_g
            if BIG_PRE_RELU:
                b_big = tl.maximum(b_g, 0.0)
        tile = (b_big, small_ptr, mask_ptr, w_ptr, o_s, o_i, o_j, m_n, o_c, m_c, Hs, Ws, C)
        acc = zero
        acc, a0, a_bias = _up_tap(acc, a0, a_bias, tile, KY0, KX0, SMALL_PRE_RELU, GRAD_MASK, WEIGHT_GRAD,
                                  BIAS_GRAD)
        if PX == 1:
            acc, a1, a_bias = _up_tap(acc, a1, a_bias, tile, KY0, 2, SMALL_PRE_RELU, GRAD_MASK, WEIGHT_GRAD,
                                      BIAS_GRAD)
        if PY == 1:
            acc, a2, a_bias = _up_tap(acc, a2, a_bias, tile, 2, KX0, SMALL_PRE_RELU, GRAD_MASK, WEIGHT_GRAD,
                                      BIAS_GRAD)
            if PX == 1:
                acc, a3, a_bias = _up_tap(acc, a3, a_bias, tile, 2, 2, SMALL_PRE_RELU, GRAD_MASK, WEIGHT_GRAD,
                                          BIAS_GRAD)
        if WEIGHT_GRAD and BIG_PRE_RELU:
            acc = tl.where(b_g > 0.0, acc, 0.0)
        tl.store(out_ptr + p_out, acc.to(out_ptr.dtype.element_ty), mask=m)
    if WEIGHT_GRAD:
        p_part = part_ptr + pid_n.to(tl.int64) * (N_PART * C) + o_c
        tl.store(p_part + (KY0 * 3 + KX0) * C, tl.sum(a0, axis=0), mask=m_c)
        if PX == 1:
            tl.store(p_part + (KY0 * 3 + 2) * C, tl.sum(a1, axis=0), mask=m_c)
        if PY == 1:
            tl.store(p_part + (6 + KX0) * C, tl.sum(a2, axis=0), mask=m_c)
            if PX == 1:
                tl.store(p_part + 8 * C, tl.sum(a3, axis=0), mask=m_c)
        if BIAS_GRAD and PY == 0 and PX == 0:
            tl.store(p_part + 9 * C, tl.sum(a_bias, axis=0), mask=m_c)


@triton.jit(do_not_specialize=_GRID_ARGS)
def _up_kernel(
    small_ptr, mask_ptr, big_ptr, w_ptr, out_ptr, part_ptr,
    n_out, Hs, Ws, Hb, Wb, C, tiles_per_prog, num_progs,
    SMALL_PRE_RELU: tl.constexpr, GRAD_MASK: tl.constexpr, BIG_PRE_RELU: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, N_PART: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs over big-grid tokens (n_out of them, flattened over the batch); big pixel (y, x) gathers small
    pixels ((y + 1 - ky) / 2, (x + 1 - kx) / 2) where both are integers in range.

    Forward of the transposed conv: small = x, out = sum_tap w * [ReLU](small[tap]).
    Backward of the stride-2 conv (WEIGHT_GRAD): small = grad_y, zeroed where mask = y <= 0 (GRAD_MASK),
    big = x, out = grad_x (masked by x > 0 when BIG_PRE_RELU), partial[pid, tap] = sum of [ReLU](x) * g[tap]
    and, with N_PART = 10, partial[pid, 9] = sum of g over the centre tap, which meets every small pixel
    exactly once because the small grid is ceil(big / 2): the bias gradient. As in ``_down_kernel`` these
    are accumulated element-wise over the program's tiles and summed over tokens once at the end.

    Which taps are valid depends only on the parity (y % 2, x % 2): program_id(0) = 4 * pid_n + class, and
    each program runs ``_up_class`` for its class with the class's 1, 2 or 4 taps known at compile time (so
    at most 4 tap accumulators live, and no masked-off loads). The class is the fastest-varying program index:
    the four programs of a token tile, which read the same small pixels, run side by side. The four classes
    of pid_n write disjoint rows of partial[pid_n] that together cover all N_PART rows.
    """
    pid = tl.program_id(0)
    pid_n = pid // 4
    cls = pid % 4
    if cls == 0:
        _up_class(small_ptr, mask_ptr, big_ptr, w_ptr, out_ptr, part_ptr, pid_n, n_out, Hs, Ws, Hb, Wb, C,
                  tiles_per_prog, num_progs, 0, 0, SMALL_PRE_RELU, GRAD_MASK, BIG_PRE_RELU, WEIGHT_GRAD, N_PART,
                  BLOCK_N, BLOCK_C)
    elif cls == 1:
        _up_class(small_ptr, mask_ptr, big_ptr, w_ptr, out_ptr, part_ptr, pid_n, n_out, Hs, Ws, Hb, Wb, C,
                  tiles_per_prog, num_progs, 0, 1, SMALL_PRE_RELU, GRAD_MASK, BIG_PRE_RELU, WEIGHT_GRAD, N_PART,
                  BLOCK_N, BLOCK_C)
    elif cls == 2:
        _up_class(small_ptr, mask_ptr, big_ptr, w_ptr, out_ptr, part_ptr, pid_n, n_out, Hs, Ws, Hb, Wb, C,
                  tiles_per_prog, num_progs, 1, 0, SMALL_PRE_RELU, GRAD_MASK, BIG_PRE_RELU, WEIGHT_GRAD, N_PART,
                  BLOCK_N, BLOCK_C)
    else:
        _up_class(small_ptr, mask_ptr, big_ptr, w_ptr, out_ptr, part_ptr, pid_n, n_out, Hs, Ws, Hb, Wb, C,
                  tiles_per_prog, num_progs, 1, 1, SMALL_PRE_RELU, GRAD_MASK, BIG_PRE_RELU, WEIGHT_GRAD, N_PART,
                  BLOCK_N, BLOCK_C)


@triton.jit
def _shuffle4_src(o_r, H, W, C):
    """Offset in the (B, H*W, 16C) expand output of the C channels that become output token o_r of the
    (B, 4H*4W, C) result: token (4h + p1, 4w + p2) is channel block p1 * 4 + p2 of input token (h, w)."""
    n_out = 16 * H * W
    o_b = o_r // n_out
    o_s = o_r - o_b * n_out
    o_y = o_s // (4 * W)
    o_x = o_s - o_y * (4 * W)
    return ((o_b * H + o_y // 4) * W + o_x // 4) * (16 * C) + ((o_y % 4) * 4 + o_x % 4) * C


@triton.jit(do_not_specialize=["n_rows", "H", "W"])
def _shuffle4_ln_fwd_kernel(y_ptr, w_ptr, b_ptr, out_ptr, n_rows, H, W, C, eps,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """LayerNorm over C of BLOCK_R output tokens, each read from its 4x4-patch slot of the expand output."""
    pid = tl.program_id(0)
    o_r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR] output tokens
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    m = (o_r < n_rows)[:, None] & m_c[None, :]
    p_src = _shuffle4_src(o_r, H, W, C)
    b_x = tl.load(y_ptr + p_src[:, None] + o_c[None, :], mask=m, other=0.0).to(tl.float32)  # [BR, BC]
    b_mean = tl.sum(b_x, axis=1) / C
    b_xc = tl.where(m, b_x - b_mean[:, None], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / C + eps)
    b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_b = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_o = b_xc * b_rstd[:, None] * b_w[None, :] + b_b[None, :]
    tl.store(out_ptr + o_r[:, None] * C + o_c[None, :], b_o.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n_rows", "H", "W", "tiles_per_prog", "num_progs"])
def _shuffle4_ln_bwd_kernel(y_ptr, g_ptr, w_ptr, dy_ptr, part_ptr, n_rows, H, W, C, eps, tiles_per_prog, num_progs,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """LayerNorm backward (statistics recomputed from y), written back through the inverse shuffle.

    dy = rstd * (w g - xhat * mean(w g xhat) - mean(w g)); partial[pid] = (sum g xhat, sum g) over the
    program's tokens, accumulated element-wise over its tiles and summed over tokens once at the end (a
    cross-warp reduction per tile would dominate the kernel's time).
    """
    pid = tl.program_id(0)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_w = tl.load(w_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    a_dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    a_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in range(tiles_per_prog):
        o_r = (pid + i * num_progs).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = (o_r < n_rows)[:, None] & m_c[None, :]
        p_src = _shuffle4_src(o_r, H, W, C)[:, None] + o_c[None, :]
        b_x = tl.load(y_ptr + p_src, mask=m, other=0.0).to(tl.float32)  # [BR, BC]
        b_g = tl.load(g_ptr + o_r[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        b_mean = tl.sum(b_x, axis=1) / C
        b_xc = tl.where(m, b_x - b_mean[:, None], 0.0)
        b_rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / C + eps)
        b_xhat = b_xc * b_rstd[:, None]
        b_wg = b_g * b_w[None, :]
        c1 = tl.sum(b_xhat * b_wg, axis=1) / C
        c2 = tl.sum(b_wg, axis=1) / C
        b_dx = (b_wg - b_xhat * c1[:, None] - c2[:, None]) * b_rstd[:, None]
        tl.store(dy_ptr + p_src, b_dx.to(dy_ptr.dtype.element_ty), mask=m)
        a_dw += b_g * b_xhat
        a_db += b_g
    p_part = part_ptr + pid.to(tl.int64) * (2 * C) + o_c
    tl.store(p_part, tl.sum(a_dw, axis=0), mask=m_c)
    tl.store(p_part + C, tl.sum(a_db, axis=0), mask=m_c)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Launch shape of one kernel.

    A tile holds about ``tile_elements`` fp32 accumulators: ``block_c`` channels (a power of two; the
    LayerNorm kernels always hold whole rows) by tile_elements / block_c tokens. A launch that reduces
    over tokens runs ``programs_per_sm`` programs per SM along the token axis in all, each looping over
    tiles (few programs keep the fp32 partials small).

    The backward kernels also keep tile-shaped fp32 parameter-gradient accumulators across their tile
    loop (9 taps in the transposed conv's backward; in the stride-2 backward only the taps of the program's
    parity class, at most 4, or the centre tap and the bias; 2 in the LayerNorm backward), so their tiles
    are spread over more threads: 4 elements per thread for the stencils and 16 for the LayerNorm keep
    them under 128 registers per thread on sm_90, without spills.
    """

    tile_elements: int = 4096
    block_c: int = 64
    num_warps: int = 4
    programs_per_sm: int = 8


# One entry per kernel launch; benchmarks/sampling.py --tune searches them.
CONFIGS: dict[str, LaunchConfig] = {
    "stride2_fwd": LaunchConfig(),
    "stride2_bwd": LaunchConfig(tile_elements=1024, num_warps=8),
    "transpose2x_fwd": LaunchConfig(),
    "transpose2x_bwd": LaunchConfig(tile_elements=1024, num_warps=8),
    "shuffle4_ln_fwd": LaunchConfig(),
    "shuffle4_ln_bwd": LaunchConfig(num_warps=8),
}
INTERPRETER_PARTIAL_PROGRAMS = 4  # programs along the token axis of a reducing launch under the interpreter


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a kernel writes is allocated here (the tests fill it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _reduction_progs(n_tiles: int, other_progs: int, device: torch.device, config: LaunchConfig) -> int:
    """Programs along the token axis of a launch that also reduces over tokens: config.programs_per_sm per SM
    in all (INTERPRETER_PARTIAL_PROGRAMS in the interpreter, so that the tests run programs looping over
    several tiles), at most one per tile."""
    if device.type == "cuda":
        target = config.programs_per_sm * multiprocessors(device)
    else:
        target = INTERPRETER_PARTIAL_PROGRAMS
    return max(1, min(n_tiles, triton.cdiv(target, other_progs)))


def _down_hw(H: int, W: int) -> tuple[int, int]:
    """Output grid of the 3x3 stride-2 padding-1 conv: (ceil(H/2), ceil(W/2))."""
    return (H + 1) // 2, (W + 1) // 2


def _launch_stencil(kernel, config: LaunchConfig, inputs: tuple[Tensor, ...], out: Tensor,
                    grid: tuple[int, int, int, int, int], n_part: int, weight_grad: bool, flags: dict) -> Tensor | None:
    """Launch a stencil kernel with its four input pointers, writing out (B, N_out, C).

    grid = (Hs, Ws, Hb, Wb) of the small and big grids and the batch size B. ``_down_kernel`` tiles the
    B * Hs * Ws small tokens; ``_up_kernel`` runs four programs (one per parity class of the big grid, each
    class at most B * Hs * Ws tokens) per token tile. Returns the (n_part, C) sums of the fp32 partials of a
    WEIGHT_GRAD launch, else None.
    """
    Hs, Ws, Hb, Wb, B = grid
    n_out, C = B * out.shape[1], out.shape[2]
    n_classes = 4 if kernel is _up_kernel else 1
    block_c = min(config.block_c, max(16, triton.next_power_of_2(C)))
    block_n = max(1, config.tile_elements // block_c)
    c_progs = triton.cdiv(C, block_c)
    n_tiles = triton.cdiv(B * Hs * Ws, block_n)
    n_progs = _reduction_progs(n_tiles, n_classes * c_progs, out.device, config) if weight_grad else n_tiles
    part = _empty((n_progs, n_part, C), torch.float32, out.device) if weight_grad else out
    kernel[(n_classes * n_progs, c_progs)](
        *inputs, out, part, n_out, Hs, Ws, Hb, Wb, C, triton.cdiv(n_tiles, n_progs), n_progs,
        WEIGHT_GRAD=weight_grad, N_PART=n_part, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=config.num_warps,
        **flags,
    )
    return part.sum(dim=0) if weight_grad else None


def _tap_grad(part: Tensor) -> Tensor:
    """(9, C) per-tap sums -> the (C, 1, 3, 3) depthwise weight gradient."""
    return part[:9].t().contiguous().view(-1, 1, 3, 3)


# ----------------------------------------------------------------------------------------------
# Custom ops: forward and backward of each Triton op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "mlla_fast::dwconv_stride2_relu_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor bias, SymInt H, SymInt W, bool input_relu) -> Tensor",
)
def _dwconv_stride2_relu_fwd(x: Tensor, weight: Tensor, bias: Tensor, H: int, W: int, input_relu: bool) -> Tensor:
    B, _, C = x.shape
    Hs, Ws = _down_hw(H, W)
    y = _empty((B, Hs * Ws, C), x.dtype, x.device)
    x = x.contiguous()
    _launch_stencil(
        _down_kernel, CONFIGS["stride2_fwd"], (x, x, weight.reshape(C, 9).contiguous(), bias.contiguous()), y,
        (Hs, Ws, H, W, B), 9, False, dict(BIG_PRE_RELU=input_relu, SMALL_PRE_RELU=False, HAS_BIAS=True, OUT_RELU=True),
    )
    return y


@_dwconv_stride2_relu_fwd.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, H: int, W: int, input_relu: bool) -> Tensor:
    Hs, Ws = _down_hw(H, W)
    return x.new_empty((x.shape[0], Hs * Ws, x.shape[2]))


@torch.library.custom_op(
    "mlla_fast::dwconv_stride2_relu_bwd", mutates_args=(),
    schema="(Tensor grad_y, Tensor x, Tensor weight, Tensor y, SymInt H, SymInt W, bool input_relu) "
           "-> (Tensor, Tensor, Tensor)",
)
def _dwconv_stride2_relu_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, H: int, W: int,
                             input_relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    B, _, C = x.shape
    Hs, Ws = _down_hw(H, W)
    grad_x = _empty(x.shape, x.dtype, x.device)
    part = _launch_stencil(
        _up_kernel, CONFIGS["stride2_bwd"],
        (grad_y.contiguous(), y.contiguous(), x.contiguous(), weight.reshape(C, 9).contiguous()), grad_x,
        (Hs, Ws, H, W, B), 10, True, dict(SMALL_PRE_RELU=False, GRAD_MASK=True, BIG_PRE_RELU=input_relu),
    )
    return grad_x, _tap_grad(part), part[9].clone()


@_dwconv_stride2_relu_bwd.register_fake
def _(grad_y: Tensor, x: Tensor, weight: Tensor, y: Tensor, H: int, W: int,
      input_relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    C = x.shape[2]
    return (x.new_empty(x.shape), x.new_empty((C, 1, 3, 3), dtype=torch.float32),
            x.new_empty((C,), dtype=torch.float32))


@torch.library.custom_op(
    "mlla_fast::dwconv_transpose2x_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, SymInt H, SymInt W, bool input_relu) -> Tensor",
)
def _dwconv_transpose2x_fwd(x: Tensor, weight: Tensor, H: int, W: int, input_relu: bool) -> Tensor:
    B, _, C = x.shape
    y = _empty((B, 4 * H * W, C), x.dtype, x.device)
    x = x.contiguous()
    _launch_stencil(
        _up_kernel, CONFIGS["transpose2x_fwd"], (x, x, x, weight.reshape(C, 9).contiguous()), y,
        (H, W, 2 * H, 2 * W, B), 9, False, dict(SMALL_PRE_RELU=input_relu, GRAD_MASK=False, BIG_PRE_RELU=False),
    )
    return y


@_dwconv_transpose2x_fwd.register_fake
def _(x: Tensor, weight: Tensor, H: int, W: int, input_relu: bool) -> Tensor:
    return x.new_empty((x.shape[0], 4 * H * W, x.shape[2]))


@torch.library.custom_op(
    "mlla_fast::dwconv_transpose2x_bwd", mutates_args=(),
    schema="(Tensor grad_y, Tensor x, Tensor weight, SymInt H, SymInt W, bool input_relu) -> (Tensor, Tensor)",
)
def _dwconv_transpose2x_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, H: int, W: int,
                            input_relu: bool) -> tuple[Tensor, Tensor]:
    B, _, C = x.shape
    grad_x = _empty(x.shape, x.dtype, x.device)
    x = x.contiguous()
    part = _launch_stencil(
        _down_kernel, CONFIGS["transpose2x_bwd"], (grad_y.contiguous(), x, weight.reshape(C, 9).contiguous(), x),
        grad_x, (H, W, 2 * H, 2 * W, B), 9, True,
        dict(BIG_PRE_RELU=False, SMALL_PRE_RELU=input_relu, HAS_BIAS=False, OUT_RELU=False),
    )
    return grad_x, _tap_grad(part)


@_dwconv_transpose2x_bwd.register_fake
def _(grad_y: Tensor, x: Tensor, weight: Tensor, H: int, W: int, input_relu: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty((x.shape[2], 1, 3, 3), dtype=torch.float32)


def _shuffle4_blocks(C: int, config: LaunchConfig) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_C >= C channels, num_warps) of a LayerNorm tile: whole rows, about tile_elements."""
    block_c = triton.next_power_of_2(C)
    return max(1, config.tile_elements // block_c), block_c, config.num_warps if block_c <= 2048 else 8


@torch.library.custom_op(
    "mlla_fast::pixel_shuffle4_layernorm_fwd", mutates_args=(),
    schema="(Tensor y, Tensor weight, Tensor bias, SymInt H, SymInt W, float eps, bool fp32_out) -> Tensor",
)
def _pixel_shuffle4_layernorm_fwd(y: Tensor, weight: Tensor, bias: Tensor, H: int, W: int, eps: float,
                                  fp32_out: bool) -> Tensor:
    B, C = y.shape[0], y.shape[2] // 16
    out = _empty((B, 16 * H * W, C), torch.float32 if fp32_out else y.dtype, y.device)
    block_r, block_c, num_warps = _shuffle4_blocks(C, CONFIGS["shuffle4_ln_fwd"])
    n_rows = B * 16 * H * W
    _shuffle4_ln_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        y.contiguous(), weight.contiguous(), bias.contiguous(), out, n_rows, H, W, C, eps,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


@_pixel_shuffle4_layernorm_fwd.register_fake
def _(y: Tensor, weight: Tensor, bias: Tensor, H: int, W: int, eps: float, fp32_out: bool) -> Tensor:
    return y.new_empty((y.shape[0], 16 * H * W, y.shape[2] // 16), dtype=torch.float32 if fp32_out else y.dtype)


@torch.library.custom_op(
    "mlla_fast::pixel_shuffle4_layernorm_bwd", mutates_args=(),
    schema="(Tensor grad_out, Tensor y, Tensor weight, SymInt H, SymInt W, float eps) -> (Tensor, Tensor, Tensor)",
)
def _pixel_shuffle4_layernorm_bwd(grad_out: Tensor, y: Tensor, weight: Tensor, H: int, W: int,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, C = y.shape[0], y.shape[2] // 16
    grad_y = _empty(y.shape, y.dtype, y.device)
    config = CONFIGS["shuffle4_ln_bwd"]
    block_r, block_c, num_warps = _shuffle4_blocks(C, config)
    n_rows = B * 16 * H * W
    n_tiles = triton.cdiv(n_rows, block_r)
    n_progs = _reduction_progs(n_tiles, 1, y.device, config)
    part = _empty((n_progs, 2, C), torch.float32, y.device)
    _shuffle4_ln_bwd_kernel[(n_progs,)](
        y.contiguous(), grad_out.contiguous(), weight.contiguous(), grad_y, part, n_rows, H, W, C, eps,
        triton.cdiv(n_tiles, n_progs), n_progs, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    part = part.sum(dim=0)
    return grad_y, part[0].clone(), part[1].clone()


@_pixel_shuffle4_layernorm_bwd.register_fake
def _(grad_out: Tensor, y: Tensor, weight: Tensor, H: int, W: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    C = y.shape[2] // 16
    return y.new_empty(y.shape), y.new_empty((C,), dtype=torch.float32), y.new_empty((C,), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Autograd functions
# ----------------------------------------------------------------------------------------------


class DWConvStride2ReLUFunction(torch.autograd.Function):
    """ReLU(depthwise 3x3 stride-2 conv + bias) on tokens, optionally of ReLU(x); Triton forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, H: int, W: int, input_relu: bool) -> Tensor:
        y = torch.ops.mlla_fast.dwconv_stride2_relu_fwd(x, weight, bias, H, W, input_relu)
        ctx.save_for_backward(x, weight, bias, y)
        ctx.grid = (H, W, input_relu)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias, y = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.mlla_fast.dwconv_stride2_relu_bwd(grad_y, x, weight, y, *ctx.grid)
        return grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype), None, None, None


class DWConvTranspose2xFunction(torch.autograd.Function):
    """Depthwise 3x3 stride-2 transposed conv (padding 1, output_padding 1) on tokens; Triton forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, H: int, W: int, input_relu: bool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.grid = (H, W, input_relu)
        return torch.ops.mlla_fast.dwconv_transpose2x_fwd(x, weight, H, W, input_relu)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = torch.ops.mlla_fast.dwconv_transpose2x_bwd(grad_y, x, weight, *ctx.grid)
        return grad_x, grad_w.to(weight.dtype), None, None, None


class PixelShuffle4LayerNormFunction(torch.autograd.Function):
    """(B, H*W, 16C) -> 4x4 pixel shuffle -> LayerNorm(C) -> (B, 16*H*W, C); Triton forward and backward."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, bias: Tensor, H: int, W: int, eps: float) -> Tensor:
        ctx.save_for_backward(y, weight, bias)
        ctx.grid = (H, W, eps)
        # The output dtype F.layer_norm would give here: autocast runs LayerNorm in fp32 on CUDA.
        fp32_out = returns_fp32(y, y.shape[2] // 16)
        return torch.ops.mlla_fast.pixel_shuffle4_layernorm_fwd(y, weight, bias, H, W, eps, fp32_out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y, weight, bias = ctx.saved_tensors
        grad_y, grad_w, grad_b = torch.ops.mlla_fast.pixel_shuffle4_layernorm_bwd(grad_out, y, weight, *ctx.grid)
        return grad_y, grad_w.to(weight.dtype), grad_b.to(bias.dtype), None, None, None


# Elements of the expand output (16C per input token) per chunk of images of the fused head: 64 MiB in bf16.
HEAD_CHUNK = 1 << 25
# The head's logit GEMMs run on CLASS_MULTIPLE-aligned class counts (16-byte rows in bf16; FinalHeadFunction).
CLASS_MULTIPLE = 8


def _head_chunks(batch: int, per_image: int) -> list[tuple[int, int]]:
    return chunk_ranges(batch, per_image, HEAD_CHUNK)


def _head_features(x: Tensor, expand_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor, H: int, W: int,
                   eps: float) -> tuple[Tensor, Tensor]:
    """(expand output y (b, H*W, 16C), the shuffled, normalised z (b, 16*H*W, C)), both in x's dtype."""
    y = F.linear(x, expand_weight)
    return y, torch.ops.mlla_fast.pixel_shuffle4_layernorm_fwd(y, norm_weight, norm_bias, H, W, eps, False)


class FinalHeadFunction(torch.autograd.Function):
    """The output head (final x4 expand, LayerNorm, 1x1 convolution) over chunks of images, keeping only its input.

    At 224², batch 48 (MLLA-UNet-T, bf16) the unfused head held, at the end of the forward, the 16C-wide expand
    output (308 MiB), the LayerNorm output in fp32 (autocast's LayerNorm dtype, 616 MiB) and its bf16 copy for
    the convolution (308 MiB): about a quarter of the step's peak memory. Here each chunk of about HEAD_CHUNK
    expand-output elements is expanded, normalised (rounded once to the compute dtype: autocast's fp32 LayerNorm
    output cast for the convolution) and projected to the logits, and the backward recomputes the chunk's
    expand output and normalised features instead of keeping them: one more (C -> 16C) GEMM and shuffle +
    LayerNorm pass.

    The logits' GEMMs take the head weight padded with zero rows to a multiple of CLASS_MULTIPLE classes (and
    the output gradient with zero columns): with 9 classes their rows were 18 bytes, and cuBLAS fell back to
    kernels for unaligned operands (cutlass_75 ``align1``: 1.0 ms of a MLLA-UNet-T training step at 224²,
    batch 48, on an H200).
    """

    @staticmethod
    def forward(ctx, x: Tensor, expand_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor, head_weight: Tensor,
                H: int, W: int, eps: float) -> Tensor:
        dtype = compute_dtype(x)
        B, N, C = x.shape
        K = head_weight.shape[0]
        padded = -(-K // CLASS_MULTIPLE) * CLASS_MULTIPLE
        with torch.autocast(x.device.type, enabled=False):
            we = cast(expand_weight, dtype)
            wh = F.pad(cast(head_weight, dtype).reshape(K, C), (0, 0, 0, padded - K))  # (padded, C), zero rows
            out = torch.empty((B, K, 16 * N), dtype=dtype, device=x.device)
            for s, e in _head_chunks(B, 16 * N * C):
                _, z = _head_features(x[s:e].to(dtype), we, norm_weight, norm_bias, H, W, eps)
                out[s:e] = (z.reshape(-1, C) @ wh.t()).view(e - s, 16 * N, padded)[..., :K].transpose(1, 2)
        ctx.save_for_backward(x, we, wh, norm_weight, norm_bias)
        ctx.grid = (H, W, eps)
        ctx.classes = K
        ctx.param_dtypes = (expand_weight.dtype, norm_weight.dtype, norm_bias.dtype, head_weight.dtype)
        return out.view(B, K, 4 * H, 4 * W)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, we, wh, norm_weight, norm_bias = ctx.saved_tensors
        H, W, eps = ctx.grid
        B, N, C = x.shape
        K, padded = ctx.classes, wh.shape[0]
        dtype = we.dtype
        acc = torch.promote_types(ctx.param_dtypes[0], torch.float32)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dwe = dwh = dnw = dnb = None
        for s, e in _head_chunks(B, 16 * N * C):
            xc = x[s:e].to(dtype)
            y, z = _head_features(xc, we, norm_weight, norm_bias, H, W, eps)
            g = F.pad(grad_out[s:e].reshape(e - s, K, 16 * N).transpose(1, 2).to(dtype), (0, padded - K))
            g = g.reshape(-1, padded)
            dwh_c = matmul_to(g.t(), z.reshape(-1, C), acc)
            del z
            dz = (g @ wh).view(e - s, 16 * N, C)
            dy, dnw_c, dnb_c = torch.ops.mlla_fast.pixel_shuffle4_layernorm_bwd(dz, y, norm_weight, H, W, eps)
            del dz, y
            dy = dy.reshape(-1, 16 * C)
            dwe_c = matmul_to(dy.t(), xc.reshape(-1, C), acc)
            if dx is not None:
                dx[s:e] = (dy @ we).view(e - s, N, C)
            if dwe is None:
                dwe, dwh, dnw, dnb = dwe_c, dwh_c, dnw_c, dnb_c
            else:
                dwe, dwh, dnw, dnb = dwe + dwe_c, dwh + dwh_c, dnw + dnw_c, dnb + dnb_c
        we_dtype, nw_dtype, nb_dtype, wh_dtype = ctx.param_dtypes
        return (dx, dwe.to(we_dtype), dnw.to(nw_dtype), dnb.to(nb_dtype), dwh[:K].view(K, C, 1, 1).to(wh_dtype),
                None, None, None)


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def _check_hw(hw: tuple[int, int]) -> tuple[int, int]:
    try:
        H, W = (int(s) for s in hw)
    except (TypeError, ValueError):
        raise ValueError(f"hw: expected a pair of positive integers (H, W), got {hw!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"hw: expected a pair of positive integers (H, W), got {hw!r}")
    return H, W


def _check_input(x: Tensor, hw: tuple[int, int], name: str, channels: int | None = None) -> tuple[int, int]:
    """Validate a (B, H*W, C) activation for the Triton kernels; returns (H, W)."""
    H, W = _check_hw(hw)
    check_tokens(x, (H, W), channels, name)
    reason = fused_supported(x)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    if x.shape[0] < 1 or x.shape[2] < 1:
        raise ValueError(f"{name}: expected at least one sample and one channel, got shape {tuple(x.shape)}")
    return H, W


def _check_param(t: Tensor, shape: tuple[int, ...], name: str, like: Tensor) -> None:
    """Raise ValueError unless t is a floating tensor of the given shape on like's device."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype == torch.float64:
        raise ValueError(f"{name}: expected a float32, bfloat16 or float16 tensor, got dtype {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device}, got one on {t.device}")


def _check_batch_norm(bn: nn.Module, channels: int) -> None:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"bn: expected a BatchNorm module (nn.BatchNorm2d), got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"bn: expected a BatchNorm over {channels} channels, got num_features={bn.num_features}")


def _batch_norm_tokens(y: Tensor, bn: nn.Module, relu: bool = False) -> Tensor:
    """bn applied to tokens y (B, N, C): per-channel statistics over all B*N tokens, as over (B, H, W) on the image;
    with relu, the ReLU of that.

    An ``nn.BatchNorm2d`` computes ``F.batch_norm`` on the (B*N, C) token matrix (no copy) with the module's own
    train/eval logic: batch statistics and a running-statistics update (momentum, or the cumulative average
    when momentum is None, counted by num_batches_tracked) in training mode, the running statistics in eval
    mode. On the fused path it runs on the Triton kernels of kernels/batch_norm.py (the running statistics
    updated here, in PyTorch, from the batch mean and variance they return; the ReLU inside the apply kernel
    and the backward's), elsewhere on ``F.batch_norm`` (and ``F.relu``). Other BatchNorm modules (e.g.
    SyncBatchNorm) run their own forward on the (B*N, C, 1, 1) view.
    """
    B, N, C = y.shape
    if type(bn) is not nn.BatchNorm2d:
        out = bn(y.reshape(B * N, C, 1, 1)).view(B, N, C)
        return F.relu(out) if relu else out
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    running = not bn.training or bn.track_running_stats
    running_mean = bn.running_mean if running else None
    running_var = bn.running_var if running else None
    x = y.reshape(B * N, C)
    if not _triton_batch_norm_supported(x, bn, running_mean, running_var, batch_stats):
        out = F.batch_norm(x, running_mean, running_var, bn.weight, bn.bias, batch_stats, factor, bn.eps)
        return (F.relu(out) if relu else out).view(B, N, C)
    if batch_stats:
        mean, var = torch.ops.mlla_fast.batch_norm_stats(x.detach())
        if running_mean is not None:
            # F.batch_norm's update: the unbiased variance, momentum * new + (1 - momentum) * old in fp32.
            M = x.shape[0]
            with torch.no_grad():
                running_mean.copy_(mean * factor + running_mean.float() * (1.0 - factor))
                running_var.copy_(var * (factor * M / (M - 1)) + running_var.float() * (1.0 - factor))
    else:
        mean, var = running_mean, running_var
    out = BatchNormTokensFunction.apply(x, mean, var, bn.weight, bn.bias, bn.eps, batch_stats, bool(relu))
    return out.view(B, N, C)


def _triton_batch_norm_supported(x: Tensor, bn: nn.BatchNorm2d, running_mean: Tensor | None,
                                 running_var: Tensor | None, batch_stats: bool) -> bool:
    """Whether ``_batch_norm_tokens`` runs the Triton BatchNorm (kernels/batch_norm.py) on the (M, C) tokens x:
    on the fused path (``fused_supported``), with parameters and statistics in fp32 or x's dtype on x's device
    (as PyTorch's mixed-precision BatchNorm takes them), both running statistics or neither, and more than one
    row where batch statistics are taken (else F.batch_norm raises its own error)."""
    if fused_supported(x) is not None or (running_mean is None) != (running_var is None):
        return False
    if batch_stats and x.shape[0] < 2:
        return False
    tensors = [t for t in (bn.weight, bn.bias, running_mean, running_var) if t is not None]
    return all(t.device == x.device and t.dtype in (torch.float32, x.dtype) for t in tensors)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------


def dwconv_stride2_relu(x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int],
                        input_relu: bool = False) -> Tensor:
    """ReLU(depthwise 3x3 conv, stride 2, padding 1, + bias) on token-major data.

    Args:
        x: (B, H*W, C) tokens on the grid hw = (H, W); with ``input_relu`` the conv reads ReLU(x).
        weight: (C, 1, 3, 3) depthwise weight. bias: (C,).
        hw: the input grid (H, W), any H, W >= 1.
        input_relu: apply ReLU to x on load (and mask its gradient), fusing a preceding ReLU.

    Returns:
        (B, ceil(H/2) * ceil(W/2), C) tokens, row-major over the output grid, in x's dtype.
    """
    H, W = _check_input(x, hw, "x")
    C = x.shape[2]
    _check_param(weight, (C, 1, 3, 3), "weight", x)
    _check_param(bias, (C,), "bias", x)
    return DWConvStride2ReLUFunction.apply(x, weight, bias, H, W, bool(input_relu))



def dwconv_transpose2x(x: Tensor, weight: Tensor, hw: tuple[int, int], input_relu: bool = False) -> Tensor:
    """Depthwise ConvTranspose2d (kernel 3, stride 2, padding 1, output_padding 1, no bias) on tokens.

    Args:
        x: (B, H*W, C) tokens on the grid hw = (H, W); with ``input_relu`` the conv reads ReLU(x).
        weight: (C, 1, 3, 3) depthwise weight (ConvTranspose2d layout, groups = C).
        hw: the input grid (H, W), any H, W >= 1.
        input_relu: apply ReLU to x on load (and mask its gradient), fusing a preceding ReLU.

    Returns:
        (B, 2H * 2W, C) tokens, row-major over the (2H, 2W) grid, in x's dtype.
    """
    H, W = _check_input(x, hw, "x")
    _check_param(weight, (x.shape[2], 1, 3, 3), "weight", x)
    return DWConvTranspose2xFunction.apply(x, weight, H, W, bool(input_relu))



def pixel_shuffle4_layernorm(y: Tensor, hw: tuple[int, int], norm_weight: Tensor, norm_bias: Tensor,
                             eps: float = 1e-5) -> Tensor:
    """LayerNorm(C) of the expand output y read as 4x4 patches, written in (4H, 4W) row-major token order.

    Args:
        y: (B, H*W, 16C); token (h, w)'s channels are read as (p1 = 4, p2 = 4, c = C) and channel block
            (p1, p2) becomes output token (4h + p1, 4w + p2).
        hw: the input grid (H, W). norm_weight, norm_bias: (C,). eps: the LayerNorm epsilon.

    Returns:
        (B, 16*H*W, C) LayerNorm'd tokens in y's dtype, or in fp32 where autocast runs LayerNorm in fp32
        (as PyTorch does on CUDA).
    """
    H, W = _check_input(y, hw, "y")
    if y.shape[2] % 16:
        raise ValueError(f"y: expected 16*C channels (4x4 patches of C), got {y.shape[2]}")
    C = y.shape[2] // 16
    _check_param(norm_weight, (C,), "norm_weight", y)
    _check_param(norm_bias, (C,), "norm_bias", y)
    return PixelShuffle4LayerNormFunction.apply(y, norm_weight, norm_bias, H, W, float(eps))



def image_batch_norm(x: Tensor, bn: nn.Module, relu: bool = False) -> Tensor:
    """bn on an image x (B, C, H, W) as on its tokens (B, H*W, C) (``_batch_norm_tokens``); with relu, its ReLU.

    A channels-last x (cuDNN's output for a channels-last input on CUDA) is a token matrix in memory, so the
    tokens are a view of it; any other layout is copied into one (a permute and a reshape). The result is the
    (B, H*W, C) output viewed as (B, C, H, W): channels-last, NCHW-shaped, ready for further convolutions,
    residual sums and ``image_to_tokens`` (a view of it, again). bn is used in its current train/eval mode
    (training mode updates its running statistics as its own forward would).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x: expected a (B, C, H, W) image, got {_shape(x)}")
    B, C, H, W = x.shape
    _check_batch_norm(bn, C)
    tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    return _batch_norm_tokens(tokens, bn, relu).view(B, H, W, C).permute(0, 3, 1, 2)


def patch_merging(
    x: Tensor,
    hw: tuple[int, int],
    expand_weight: Tensor,
    expand_bias: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    bn: nn.BatchNorm2d,
) -> Tensor:
    """EDSM on tokens: 1x1 conv C->E + ReLU, DW 3x3 stride-2 conv + ReLU, 1x1 conv E->C_out + BatchNorm.

    Mirrors ``reference.ops.patch_merging_ref``. E = 8C and C_out = 2C in MLLA-UNet.

    Args:
        x: (B, H*W, C) tokens on the grid hw = (H, W).
        expand_weight: (E, C, 1, 1), expand_bias: (E,). dw_weight: (E, 1, 3, 3), dw_bias: (E,).
        reduce_weight: (C_out, E, 1, 1), reduce_bias: (C_out,). bn: BatchNorm2d(C_out), used in its
            current train/eval mode (training mode updates its running statistics).

    Returns:
        (B, ceil(H/2) * ceil(W/2), C_out) tokens.
    """
    H, W = _check_input(x, hw, "x")
    C = x.shape[2]
    if not isinstance(expand_weight, Tensor) or expand_weight.dim() != 4:
        raise ValueError(f"expand_weight: expected an (E, {C}, 1, 1) 1x1 conv weight, got {_shape(expand_weight)}")
    E = expand_weight.shape[0]
    if not isinstance(reduce_weight, Tensor) or reduce_weight.dim() != 4:
        raise ValueError(f"reduce_weight: expected a (C_out, {E}, 1, 1) 1x1 conv weight, got {_shape(reduce_weight)}")
    C_out = reduce_weight.shape[0]
    _check_param(expand_weight, (E, C, 1, 1), "expand_weight", x)
    _check_param(expand_bias, (E,), "expand_bias", x)
    _check_param(dw_weight, (E, 1, 3, 3), "dw_weight", x)
    _check_param(dw_bias, (E,), "dw_bias", x)
    _check_param(reduce_weight, (C_out, E, 1, 1), "reduce_weight", x)
    _check_param(reduce_bias, (C_out,), "reduce_bias", x)
    _check_batch_norm(bn, C_out)
    h = linear(x, expand_weight.view(E, C), expand_bias)
    h = DWConvStride2ReLUFunction.apply(h, dw_weight, dw_bias, H, W, True)
    h = linear(h, reduce_weight.view(C_out, E), reduce_bias)
    return _batch_norm_tokens(h, bn)


def patch_expand(
    x: Tensor,
    hw: tuple[int, int],
    expand_weight: Tensor,
    expand_bias: Tensor,
    dwt_weight: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    bn: nn.BatchNorm2d,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """EUSM on tokens: 1x1 conv C->E + ReLU, DW transposed 3x3 stride-2 conv, 1x1 conv E->C_out + BatchNorm,
    LayerNorm(C_out).

    Mirrors ``reference.ops.patch_expand_ref``. E = 4C and C_out = C/2 in MLLA-UNet.

    Args:
        x: (B, H*W, C) tokens on the grid hw = (H, W).
        expand_weight: (E, C, 1, 1), expand_bias: (E,). dwt_weight: (E, 1, 3, 3) (no bias).
        reduce_weight: (C_out, E, 1, 1), reduce_bias: (C_out,). bn: BatchNorm2d(C_out), used in its
            current train/eval mode. norm_weight, norm_bias: (C_out,). eps: the LayerNorm epsilon.

    Returns:
        (B, 4*H*W, C_out) tokens on the (2H, 2W) grid.
    """
    H, W = _check_input(x, hw, "x")
    C = x.shape[2]
    if not isinstance(expand_weight, Tensor) or expand_weight.dim() != 4:
        raise ValueError(f"expand_weight: expected an (E, {C}, 1, 1) 1x1 conv weight, got {_shape(expand_weight)}")
    E = expand_weight.shape[0]
    if not isinstance(reduce_weight, Tensor) or reduce_weight.dim() != 4:
        raise ValueError(f"reduce_weight: expected a (C_out, {E}, 1, 1) 1x1 conv weight, got {_shape(reduce_weight)}")
    C_out = reduce_weight.shape[0]
    _check_param(expand_weight, (E, C, 1, 1), "expand_weight", x)
    _check_param(expand_bias, (E,), "expand_bias", x)
    _check_param(dwt_weight, (E, 1, 3, 3), "dwt_weight", x)
    _check_param(reduce_weight, (C_out, E, 1, 1), "reduce_weight", x)
    _check_param(reduce_bias, (C_out,), "reduce_bias", x)
    _check_param(norm_weight, (C_out,), "norm_weight", x)
    _check_param(norm_bias, (C_out,), "norm_bias", x)
    _check_batch_norm(bn, C_out)
    h = linear(x, expand_weight.view(E, C), expand_bias)
    h = DWConvTranspose2xFunction.apply(h, dwt_weight, H, W, True)
    h = _batch_norm_tokens(linear(h, reduce_weight.view(C_out, E), reduce_bias), bn)
    return layer_norm(h, norm_weight, norm_bias, eps)


def final_expand(x: Tensor, hw: tuple[int, int], expand_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                 eps: float = 1e-5) -> Tensor:
    """Final x4 expand on tokens: Linear C->16C (no bias), then the fused 4x4 pixel shuffle + LayerNorm(C).

    Mirrors ``reference.ops.final_expand_ref``.

    Args:
        x: (B, H*W, C) tokens on the grid hw = (H, W).
        expand_weight: (16C, C) Linear weight. norm_weight, norm_bias: (C,). eps: the LayerNorm epsilon.

    Returns:
        (B, 16*H*W, C) tokens, row-major over the (4H, 4W) grid.
    """
    H, W = _check_input(x, hw, "x")
    C = x.shape[2]
    _check_param(expand_weight, (16 * C, C), "expand_weight", x)
    _check_param(norm_weight, (C,), "norm_weight", x)
    _check_param(norm_bias, (C,), "norm_bias", x)
    return PixelShuffle4LayerNormFunction.apply(linear(x, expand_weight), norm_weight, norm_bias, H, W, float(eps))


def final_head(x: Tensor, hw: tuple[int, int], expand_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor,
               head_weight: Tensor, eps: float = 1e-5) -> Tensor:
    """The U-Net's output head on tokens: ``final_expand`` and the 1x1 convolution without bias, fused over
    chunks of images that are recomputed in the backward (``FinalHeadFunction``). Mirrors
    ``reference.ops.final_head_ref``.

    Args:
        x: (B, H*W, C) tokens on the grid hw = (H, W).
        expand_weight: (16C, C). norm_weight, norm_bias: (C,). head_weight: (K, C, 1, 1) convolution weight.
        eps: the LayerNorm epsilon.

    Returns:
        (B, K, 4H, 4W) logits, in the compute dtype (autocast's, else x's).
    """
    H, W = _check_input(x, hw, "x")
    C = x.shape[2]
    _check_param(expand_weight, (16 * C, C), "expand_weight", x)
    _check_param(norm_weight, (C,), "norm_weight", x)
    _check_param(norm_bias, (C,), "norm_bias", x)
    if not isinstance(head_weight, Tensor) or head_weight.dim() != 4 or head_weight.shape[0] < 1:
        raise ValueError(f"head_weight: expected a (K, {C}, 1, 1) convolution weight, got {_shape(head_weight)}")
    _check_param(head_weight, (head_weight.shape[0], C, 1, 1), "head_weight", x)
    return FinalHeadFunction.apply(x, expand_weight, norm_weight, norm_bias, head_weight, H, W, float(eps))


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def module_args(module: nn.Module) -> tuple:
    """The arguments after (x, hw) of ``patch_merging``, ``patch_expand`` or ``final_expand`` for a reference
    ``PatchMerging``, ``PatchExpand`` or ``FinalPatchExpand_X4`` (or a subclass): its parameters and BatchNorm,
    so that e.g. ``patch_merging(x, hw, *module_args(module))`` computes ``module(x, hw)``."""
    if not isinstance(module, TokenSampler):
        raise ValueError(
            f"module: expected a PatchMerging, PatchExpand or FinalPatchExpand_X4, got {type(module).__name__}"
        )
    return module.op_args()
