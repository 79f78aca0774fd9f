"""cpe + residual + LayerNorm, then a Linear on the normed tokens, keeping only the input x for the backward.

In the fused block, ``h = LayerNorm(x + dwconv3x3(x))`` feeds the gate/value GEMM. ``cpe_residual_norm`` followed
by ``linear`` keeps x (the stencil's backward recomputes r from it) and h (for the GEMM's weight gradient): two
(B, N, C) tensors per block held from the forward to the backward. ``cpe_norm_linear`` keeps x alone. Its
backward computes dh = dy W first, then the stencil's backward kernel, which recomputes r and the LayerNorm
statistics anyway, also writes h (one more (B, N, C) store in that kernel, ``kernels.dwconv``'s WRITE_H) for
dW = dy^T h. On an H100, one block (C=64, batch 2, 512², bf16) holds one unit of B*N*C less at its memory peak
(the attention's backward).

An optional ``residual_bias`` (C,) is added to the r returned (not to the r that is normed): the block adds the
attention branch's output-projection bias to its residual stream here, in the stencil's store, so that the
branch's out_proj GEMM can add its output to r itself (addmm, beta=1) without a bias. Its gradient, dr summed
over tokens, comes from the stencil's backward kernel, which reads dr anyway (``kernels.dwconv``'s RBIAS_GRAD):
no separate add kernel in the forward, no column sum of the out bias's gradient in the backward. With
``residual_scale`` (B,) the bias is scaled per sample (drop-path's factor on the attention branch), and so is dr
in its gradient's sum.

The stencil and the GEMMs run inside two custom ops (``mlla_fast::cpe_norm_linear_fwd``/``_bwd``), opaque to
torch.compile, whose partitioner would otherwise keep h. Autocast is honoured as in ``mlla_fast.linear``: the
GEMM runs in the autocast dtype (else x's) with the weight and bias cast once per call; r and h are in x's
dtype (residual_bias is not cast: it is added in fp32 and the sum rounded once). Gradients come back in the
dtypes of x and the parameters; the GEMM's are computed in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import _describe
from .casts import cast_cat
from .kernels.dwconv import (
    MAX_NORM_CHANNELS,
    _check_stencil_inputs,
    check_sample_scale,
    cpe_residual_norm_bwd_h,
    cpe_residual_norm_fwd,
)
from .linear import bias_grad, compute_dtype, matmul_to


def _fwd(x: Tensor, cpe_weight: Tensor, cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
         bias: Tensor | None, residual_bias: Tensor | None, residual_scale: Tensor | None, H: int, W: int,
         eps: float) -> tuple[Tensor, Tensor]:
    r, h = cpe_residual_norm_fwd(x, cpe_weight, cpe_bias, norm_weight, norm_bias, (H, W), eps, residual_bias,
                                 residual_scale)
    with torch.autocast(x.device.type, enabled=False):
        return r, F.linear(h.to(weight.dtype), weight, bias)


def _bwd(dr: Tensor | None, dy: Tensor | None, x: Tensor, cpe_weight: Tensor, cpe_bias: Tensor, norm_weight: Tensor,
         norm_bias: Tensor, weight: Tensor, residual_bias: Tensor | None, residual_scale: Tensor | None, H: int,
         W: int, eps: float, has_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d cpe_weight, d cpe_bias, d norm_weight, d norm_bias, d weight, d bias, d residual_bias): the
    stencil's and norm's in their parameters' dtypes, the GEMM's in fp32 (d bias empty without a bias; both
    zero when dy is None), residual_bias's in its dtype (empty fp32 when residual_bias is None, which the
    backward passes where its gradient is not needed; zero when dr is None)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    dh = dy2 = None
    if dy is not None:
        dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            dh = (dy2 @ weight).to(x.dtype).view(x.shape)
    has_rbias = residual_bias is not None
    dx, dcw, dcb, dnw, dnb, h, drbias = cpe_residual_norm_bwd_h(
        dr, dh, x, cpe_weight, cpe_bias, norm_weight, norm_bias, (H, W), eps, write_h=True,
        residual_bias_grad=has_rbias, residual_bias_dtype=residual_bias.dtype if has_rbias else torch.float32,
        residual_scale=residual_scale if has_rbias else None)
    del dh
    if drbias is None:
        drbias = x.new_empty((0,), dtype=torch.float32)
    if dy2 is None:
        dweight = weight.new_zeros(weight.shape, dtype=acc)
        dbias = weight.new_zeros((weight.shape[0],) if has_bias else (0,), dtype=acc)
    else:
        dweight = matmul_to(dy2.t(), h.view(-1, h.shape[-1]).to(weight.dtype), acc)
        dbias = bias_grad(dy2, acc) if has_bias else weight.new_empty((0,), dtype=acc)
    return dx, dcw, dcb, dnw, dnb, dweight, dbias, drbias


_FWD_SCHEMA = "(Tensor x, Tensor cpe_weight, Tensor cpe_bias, Tensor norm_weight, Tensor norm_bias, " \
    "Tensor weight, Tensor? bias, Tensor? residual_bias, Tensor? residual_scale, SymInt H, SymInt W, float eps) " \
    "-> (Tensor, Tensor)"
_BWD_SCHEMA = "(Tensor? dr, Tensor? dy, Tensor x, Tensor cpe_weight, Tensor cpe_bias, Tensor norm_weight, " \
    "Tensor norm_bias, Tensor weight, Tensor? residual_bias, Tensor? residual_scale, SymInt H, SymInt W, " \
    "float eps, bool has_bias) " \
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

cpe_norm_linear_fwd_op = torch.library.custom_op("mlla_fast::cpe_norm_linear_fwd", _fwd, mutates_args=(),
                                                 schema=_FWD_SCHEMA)
cpe_norm_linear_bwd_op = torch.library.custom_op("mlla_fast::cpe_norm_linear_bwd", _bwd, mutates_args=(),
                                                 schema=_BWD_SCHEMA)


@cpe_norm_linear_fwd_op.register_fake
def _(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, residual_bias, residual_scale, H, W, eps):
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


@cpe_norm_linear_bwd_op.register_fake
def _(dr, dy, x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, residual_bias, residual_scale, H, W, eps,
      has_bias):
    acc = torch.promote_types(weight.dtype, torch.float32)
    return (x.new_empty(x.shape), torch.empty_like(cpe_weight), torch.empty_like(cpe_bias),
            torch.empty_like(norm_weight), torch.empty_like(norm_bias), weight.new_empty(weight.shape, dtype=acc),
            weight.new_empty((weight.shape[0],) if has_bias else (0,), dtype=acc),
            x.new_empty((0,), dtype=torch.float32) if residual_bias is None else torch.empty_like(residual_bias))


class _CpeNormLinear(torch.autograd.Function):
    """The op and its backward; the Linear's weight and bias come as ``n_weights`` row blocks each (stacked along
    dim 0, the biases' blocks after the weights'), so that a layer whose GEMM runs on stacked weights (the block's
    gate and value projections) needs no concatenation of its parameters (``casts.cast_cat``)."""

    @staticmethod
    def forward(ctx, x: Tensor, cpe_weight: Tensor, cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                residual_bias: Tensor | None, residual_scale: Tensor | None, H: int, W: int, eps: float,
                n_weights: int, *blocks: Tensor | None) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(x)
        weights, biases = blocks[:n_weights], blocks[n_weights:]
        has_bias = biases[0] is not None
        wc = cast_cat(weights, dtype)
        r, y = cpe_norm_linear_fwd_op(x, cpe_weight, cpe_bias, norm_weight, norm_bias, wc,
                                      cast_cat(biases, dtype) if has_bias else None, residual_bias, residual_scale,
                                      H, W, eps)
        ctx.save_for_backward(x, cpe_weight, cpe_bias, norm_weight, norm_bias, wc, residual_bias, residual_scale)
        ctx.grid, ctx.eps = (H, W), eps
        ctx.rows = [w.shape[0] for w in weights]
        ctx.dtypes = [None if b is None else b.dtype for b in blocks]
        ctx.has_bias = has_bias
        ctx.set_materialize_grads(False)
        return r, y

    @staticmethod
    def backward(ctx, dr: Tensor | None, dy: Tensor | None):
        x, cpe_weight, cpe_bias, norm_weight, norm_bias, wc, residual_bias, residual_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dr is None and dy is None:
            return (None,) * (11 + len(ctx.dtypes))
        dx, dcw, dcb, dnw, dnb, dweight, dbias, drbias = cpe_norm_linear_bwd_op(
            dr, dy, x, cpe_weight, cpe_bias, norm_weight, norm_bias, wc, residual_bias if need[5] else None,
            residual_scale, *ctx.grid, ctx.eps, ctx.has_bias)
        grads = [g if needed else None for g, needed in zip((dx, dcw, dcb, dnw, dnb), need[:5], strict=True)]
        dbiases = dbias.split(ctx.rows) if ctx.has_bias else [None] * len(ctx.rows)
        dblocks = [g.to(dt) if needed and g is not None else None for g, dt, needed in zip(
            (*dweight.split(ctx.rows), *dbiases), ctx.dtypes, need[11:], strict=True)]
        return (*grads, drbias if need[5] else None, None, None, None, None, None, *dblocks)


def cpe_norm_linear(x: Tensor, cpe_weight: Tensor, cpe_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                    linear_weight: Tensor | Sequence[Tensor], linear_bias: Tensor | Sequence[Tensor] | None,
                    hw: tuple[int, int], eps: float = 1e-5, *,
                    residual_bias: Tensor | None = None,
                    residual_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``r, h = cpe_residual_norm(x, cpe_weight, cpe_bias, norm_weight, norm_bias, hw, eps)`` then
    ``(r, linear(h, linear_weight, linear_bias))`` (``kernels.dwconv``, ``mlla_fast.linear``), h not kept for
    the backward; with residual_bias, ``(r + residual_bias, linear(h, ...))``, h still the LayerNorm of r.

    Args:
        x: (B, N, C) tokens on the grid hw, as for ``cpe_residual_norm``.
        cpe_weight, cpe_bias, norm_weight, norm_bias, hw, eps: as for ``cpe_residual_norm``.
        linear_weight, linear_bias: (M, C) and (M,) or None (any float dtype; cast to the compute dtype); or a
            sequence of row blocks of each, (M_i, C) and (M_i,) (all biases or none), for the Linear on their
            concatenation along dim 0 (each block gets its own gradient; no concatenated copy is made where
            ``casts.cast_parameters`` holds the blocks' copies side by side).
        residual_bias: (C,) or None (any float dtype, not cast): a bias added to the residual stream r that is
            returned (in the stencil's store, rounded once), such as the block's attention out_proj bias, so that
            the out_proj GEMM can accumulate into r without a bias of its own. Its gradient is dr summed over
            tokens, from the stencil's backward kernel.
        residual_scale: (B,) float32 or None, only with residual_bias: sample b's r gets
            ``residual_scale[b] * residual_bias`` (the bias of a branch that drop-path scales per sample; its
            gradient sums residual_scale[b] * dr). Not differentiated.

    Returns:
        r (B, N, C) (plus residual_bias) in x's dtype and y (B, N, M) in the compute dtype (autocast's, else
        x's), M the blocks' rows together.
    """
    params = {"cpe_bias": cpe_bias, "norm_weight": norm_weight, "norm_bias": norm_bias}
    if residual_bias is not None:
        params["residual_bias"] = residual_bias
    H, W = _check_stencil_inputs(x, hw, cpe_weight, params, MAX_NORM_CHANNELS)
    check_sample_scale(residual_scale, x, "residual_scale", residual_bias is not None, "residual_bias")
    C = x.shape[-1]
    weights = [linear_weight] if isinstance(linear_weight, Tensor) else list(linear_weight)
    if linear_bias is None:
        biases = [None] * len(weights)
    else:
        biases = [linear_bias] if isinstance(linear_bias, Tensor) else list(linear_bias)
    if not weights or len(biases) != len(weights):
        raise ValueError(f"linear_weight, linear_bias: expected one or more weight blocks and as many bias blocks "
                         f"(or linear_bias None), got {len(weights)} and {len(biases)}")
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        name = "linear_weight" if isinstance(linear_weight, Tensor) else f"linear_weight[{i}]"
        if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != C:
            raise ValueError(f"{name}: expected shape (M, {C}) for x's {C} channels, got {_describe(w)}")
        bname = "linear_bias" if isinstance(linear_bias, Tensor) else f"linear_bias[{i}]"
        if linear_bias is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0],)):
            raise ValueError(f"{bname}: expected shape ({w.shape[0]},) for {name}'s rows, got {_describe(b)}")
        for tname, t in ((name, w), (bname, b)):
            if t is not None and (not t.is_floating_point() or t.device != x.device):
                raise ValueError(f"{tname}: expected a floating-point tensor on x's device {x.device}, got {t.dtype} "
                                 f"on {t.device}")
    return _CpeNormLinear.apply(x, cpe_weight, cpe_bias, norm_weight, norm_bias, residual_bias, residual_scale, H, W,
                                float(eps), len(weights), *weights, *biases)
