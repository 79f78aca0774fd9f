"""The block's qk projection and fused linear attention as one autograd Function that recomputes qk.

``linear(v, W_qk, b_qk)`` followed by ``kernels.linear_attention.linear_attention`` keeps the (B, N, 2C)
projection qk from the forward until the attention's backward, as the attention's input: in a GPU memory
snapshot of an MLLA-UNet-T training step (224², batch 48, bf16) these qk tensors were about 20 of the 245
units live at the peak (the end of the forward). ``qk_linear_attention`` keeps v, g, the cast qk weight and
bias and the attention's O(B h d²) state instead, and its backward redoes the qk GEMM (the same call on the
same operands: the forward's qk bitwise) before the attention's backward, 2C² of the block's 13C² forward
multiply-adds per token. One fp32 block (C=64, 16x16 grid, batch 2) saves 8.4x its input for the backward
instead of 10.4x. The projection's gradients follow the attention's: dv += dqk @ W in place into the
attention's dv (no second (B, N, C) gradient to sum), dW in fp32 out of the GEMM as in ``mlla_fast.linear``,
and the bias gradient by the Triton column sum. For a large v (``SPLIT_QK_BYTES``) q and k are projected and
differentiated one at a time instead, so that the backward's own (B, N, C) tensors peak at five instead of
seven (qk and dqk whole): on an H100, one block (C=64, batch 2, 512², bf16) peaked 12 units of B*N*C above
its start instead of 14 (13 in ``benchmarks/profile_block.py --memory``'s count, where the attention's
backward held do, dg, dv, k and dk). The k/v kernel now writes dk over k, in place, and the peak holds four.
On that path the forward's k is never written: the reduction kernel projects it from v itself
(``kernels.linear_attention.Projected``, ``PROJECTED_K_MAX_CHANNELS``).

With ``out_weight`` the block's output projection runs inside the same Function: the attention's output a,
which the projection's weight gradient needs, is not kept (one (B, N, C) tensor per block) but rewritten by
the backward's gate pass, which recomputes it anyway, in place over da = dy W_out, which exists only inside
the backward.

``gv_linear_attention`` takes the block's gate/value projection gv = [g, u] (B, N, 2C) instead of v and g: the
value's depthwise convolution + SiLU (``kernels.dwconv``) runs inside the same Function, and its backward writes
the gate's gradient and u's into the two halves of one d gv instead of a concatenation of the two: on an H100, the
concatenation took 0.38 ms of a 16.9 ms block step (C=64, batch 2, 1024², bf16). The u half holds the attention
backward's gated output gradient do until d u is written there, so that d gv costs no memory at the backward's
peak. (Two other ways to keep that peak were measured on an H100 and dropped: the q kernel writing dq over q
behind a barrier took 254 registers instead of 230 and 0.99 ms instead of 0.77 ms at 1024²; summing the qk bias
gradient inside the q and k kernels instead of by column sums took the k/v kernel from 56 to 130 registers, and
the step from 16.7 to 18.1 ms of GPU time.) With ``residual``, out_proj's GEMM accumulates into the residual
stream itself, in place (``addmm_``, beta = 1; the residual tensor is updated and returned), instead of a
separate add kernel (0.26 ms at 1024²) or an addmm into a new tensor, which copies the residual there first
(0.17 ms). Drop-path keeps that path: ``gv_linear_attention``'s ``scale`` (per sample) is applied by the output
pass, which writes scale * a for the GEMM, and by its backward counterpart, instead of an ``addcmul`` over
(B, N, C) in the forward and a multiply in the backward.

The GEMMs and their recomputes run inside two custom ops (``mlla_fast::qk_linear_attention_fwd``/``_bwd``),
opaque to torch.compile: with the GEMM as graph nodes, AOTAutograd's partitioner merges the backward's
recompute with the forward's GEMM (common-subexpression elimination) or moves it into the forward (it
never recomputes matmuls), and saves qk again.

Autocast is honoured as in ``mlla_fast.linear``: the GEMM runs in the autocast dtype (else v's) with the
weight and bias cast once per call; v and g must already be in that dtype (the attention's activation
dtype). Gradients come back in the dtypes of the inputs and parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .casts import cast
from .kernels import linear_attention as _la
from .kernels.dwconv import _check_stencil_inputs, check_sample_scale, dwconv_silu_bwd, dwconv_silu_fwd
from .kernels.linear_attention import (
    Projected,
    _check_inputs,
    _linear_attention_bwd,
    _linear_attention_fwd,
    _token_major,
    attention_output,
    attention_state,
    fake_bwd_outputs,
    fake_fwd_outputs,
    gate_grad_from_output,
    gated_output_grad,
    kv_side_grad,
    lepe_param_grads,
    q_side_grad,
)
from .linear import bias_grad, compute_dtype, matmul_to


def _project(v: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(v, weight, bias) on the operands as given (in v's dtype), autocast or not: the forward's GEMMs
    and the backward's recomputes are the same calls, bitwise equal."""
    with torch.autocast(v.device.type, enabled=False):
        return F.linear(v, weight, bias)


def _halves(qk_weight: Tensor, qk_bias: Tensor | None, C: int):
    """(W_q, b_q), (W_k, b_k): the q and k rows of the projection."""
    return ((qk_weight[:C], None if qk_bias is None else qk_bias[:C]),
            (qk_weight[C:], None if qk_bias is None else qk_bias[C:]))


# From this size of v (bytes) on, q and k are projected and differentiated one at a time (the backward's peak
# holds five (B, N, C) tensors of its own instead of seven); below it, as one (B, N, 2C) qk: fewer, larger
# GEMMs and column sums. On an H100, MLLA-UNet-T's training step (224², batch 48: v of at most 19 MiB, its
# memory peak at the end of the forward) took 39.0 ms with every block split, against 38.1 ms with none.
SPLIT_QK_BYTES = 32 << 20


# Up to this many channels the forward's reduction kernel projects k itself (``Projected``) on the large-v path,
# instead of reading it from a GEMM's output: on an H100 (C=64, batch 2, 1024², bf16) the kernel took 0.24 ms
# instead of 0.21 ms and the k GEMM's 0.18 ms went. Its token loop is software-pipelined, and the projection's
# tiles grow its shared memory with C: 34 KiB at C=64, 58 KiB at C=128, 106 KiB at C=256, 202 KiB at C=512
# (compiled offline for sm_90a by Triton 3.9, ``benchmarks/kernel_registers.py --projected``), too much for more
# than one program per SM past C=128; only C=64 was timed.
PROJECTED_K_MAX_CHANNELS = 128


# Whether a gated attention keeps its pre-gate output o (B, N, C) for the backward, whose gate pass is then an
# element-wise kernel (``gate_grad_from_output``: dy, o and g in, dg, do and a out) instead of the output pass
# again (q's features, q~ . kv, the normaliser and the LePE recomputed): one (B, N, C) tensor more between the
# forward and the backward, one more written by the forward. Measured on an H200 (GPU time per step, bf16): a
# MLLA-UNet-T training step (224², batch 48) 26.72 against 27.26 ms, a 1024² block step (C=64, batch 2) 14.08
# against 14.69 ms (benchmarks/results/nvidia-h200/2026-11-28-session17, call A). False trades that time for the
# memory of one (B, N, C) tensor per attention.
SAVE_ATTENTION_OUTPUT = True


def _split_qk(v: Tensor) -> bool:
    return v.numel() * v.element_size() >= SPLIT_QK_BYTES


def _qk_linear_attention_fwd(v: Tensor, g: Tensor | None, qk_weight: Tensor, qk_bias: Tensor | None,
                             lepe_weight: Tensor, lepe_bias: Tensor, out_weight: Tensor | None,
                             out_bias: Tensor | None, H: int, W: int, num_heads: int, gate_silu: bool,
                             scale: Tensor | None = None,
                             save_output: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The attention's forward (y, kv, ksum, o), weights in v's dtype: qk = v W_qk + b_qk, or for a large v
    k = v W_k + b_k for the state (projected inside the reduction kernel up to ``PROJECTED_K_MAX_CHANNELS``),
    then q = v W_q + b_q for the output pass, one (B, N, C) projection live at a time; with out_weight, y is
    the attention's output a projected, a W_out^T + b_out, and a is dropped. With a (B,) fp32 scale, a is
    scaled per sample by the output pass. With save_output (and a gate), o is the pre-gate output (B, N, C),
    else None."""
    v = _token_major(v)
    g = None if g is None else _token_major(g)
    o = _la._empty(v.shape, v.dtype, v.device) if save_output and g is not None else None
    if not _split_qk(v):
        y, kv, ksum = _linear_attention_fwd(_project(v, qk_weight, qk_bias), v, g, lepe_weight, lepe_bias, H, W,
                                            num_heads, gate_silu, scale, o=o)
    else:
        (wq, bq), (wk, bk) = _halves(qk_weight, qk_bias, v.shape[2])
        k = Projected(v, wk, bk) if v.shape[2] <= PROJECTED_K_MAX_CHANNELS else _project(v, wk, bk)
        kv, ksum = attention_state(k, v, W, num_heads)
        del k
        y = attention_output(_project(v, wq, bq), v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu,
                             scale, o=o)
    if out_weight is None:
        return y, kv, ksum, o
    return _project(y, out_weight, out_bias), kv, ksum, o


def _qk_linear_attention_bwd(dy: Tensor, v: Tensor, g: Tensor | None, qk_weight: Tensor, qk_bias: Tensor | None,
                             lepe_weight: Tensor, lepe_bias: Tensor, out_weight: Tensor | None,
                             out_bias: Tensor | None, kv: Tensor, ksum: Tensor, H: int, W: int, num_heads: int,
                             gate_silu: bool, dg: Tensor | None = None, do: Tensor | None = None,
                             scale: Tensor | None = None, o: Tensor | None = None) -> tuple[Tensor, ...]:
    """The attention's and the projections' backward: (dv, dg, d qk_weight, d qk_bias, d lepe_weight,
    d lepe_bias, d out_weight, d out_bias), the projections' gradients in fp32 (empty where there is no such
    parameter); dg and the backward's gated output gradient do are written into the given (B, N, C) tensors
    (channels contiguous) when given.

    With out_weight, the attention's output gradient da = dy W_out exists only inside this function, and the
    gate pass rewrites the forward's output a (bitwise) over it, in place, for d out_weight = dy^T a.
    For a large v (``SPLIT_QK_BYTES``) q and k are recomputed one at a time, and the (B, N, C) dq and dk are
    folded into dv as soon as they exist: dv = dq W_q (a GEMM), the k/v kernel adds the attention's own dv to
    it and writes dk over k, then dv += dk W_k in place. At most four (B, N, C) tensors of its own are live at
    once (da/a, q, do, dg in the gate pass; do, dg, q, dq on the q side; do, dg, dv, k/dk on the k/v side),
    against seven with qk and dqk whole and a and da apart. With the forward's per-sample scale (B,), dy is the
    gradient of the scaled output; the gate pass scales da and writes a scaled. With the forward's pre-gate
    output o (``SAVE_ATTENTION_OUTPUT``), the gate pass is element-wise from it (``gate_grad_from_output``), and
    on the large-v path q is projected after it."""
    dy, v = _token_major(dy), _token_major(v)
    g = None if g is None else _token_major(g)
    B, N, C = v.shape
    acc = torch.promote_types(qk_weight.dtype, torch.float32)
    v2 = v.reshape(-1, C)
    da = _output_grad(dy, out_weight)
    # a over da where the gate pass may (da is this function's own, and the pass returns do apart from it)
    a = None if out_weight is None else (da if g is not None else v.new_empty(v.shape))
    has_bias = qk_bias is not None
    if not _split_qk(v):
        dqk, dv, dg, dlepe_w, dlepe_b = _linear_attention_bwd(
            da, _project(v, qk_weight, qk_bias), v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu,
            a=a, dg=dg, do=do, scale=scale, o=o)
        del da
        out_grads = _out_projection_grads(dy, a, out_weight, out_bias, acc)
        del a
        dqk = dqk.view(-1, 2 * C)
        with torch.autocast(v.device.type, enabled=False):
            dv.view(-1, C).addmm_(dqk, qk_weight)
        return (dv, dg, *_projection_grads(dqk, v2, has_bias, acc), dlepe_w, dlepe_b, *out_grads)
    (wq, bq), (wk, bk) = _halves(qk_weight, qk_bias, C)
    if o is not None:
        do, dg = gate_grad_from_output(da, o, g, gate_silu, a=a, dg=dg, do=do, scale=scale)
        q = _project(v, wq, bq)
    else:
        q = _project(v, wq, bq)
        do, dg = gated_output_grad(da, q, v, g, lepe_weight, lepe_bias, kv, ksum, H, W, num_heads, gate_silu, a=a,
                                   dg=dg, do=do, scale=scale)
    del da
    out_grads = _out_projection_grads(dy, a, out_weight, out_bias, acc)
    del a
    dq = torch.empty_like(v)
    dkv, dksum, inv_n = q_side_grad(do, q, kv, ksum, W, num_heads, dq)
    del q
    dq = dq.view(-1, C)
    with torch.autocast(v.device.type, enabled=False):
        dv = (dq @ wq).view(B, N, C)
    grads_q = _projection_grads(dq, v2, has_bias, acc)
    del dq
    k = _project(v, wk, bk)
    kv_side_grad(do, k, v, lepe_weight, dkv, dksum, inv_n, H, W, num_heads, k, dv, accumulate=True)  # dk over k
    dlepe_w, dlepe_b = lepe_param_grads(do, v, lepe_weight, lepe_bias, H, W)
    del do
    dk = k.view(-1, C)
    with torch.autocast(v.device.type, enabled=False):
        dv.view(-1, C).addmm_(dk, wk)
    grads_k = _projection_grads(dk, v2, has_bias, acc)
    return (dv, dg, torch.cat([grads_q[0], grads_k[0]]), torch.cat([grads_q[1], grads_k[1]]), dlepe_w, dlepe_b,
            *out_grads)


def _fwd(x: Tensor, g: Tensor | None, dwc_weight: Tensor | None, dwc_bias: Tensor | None, qk_weight: Tensor,
         qk_bias: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor, out_weight: Tensor | None,
         out_bias: Tensor | None, scale: Tensor | None, H: int, W: int, num_heads: int,
         gate_silu: bool, save_output: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, v, kv, ksum, o). With dwc_weight, x is the gate/value projection gv (B, N, 2C), g = gv[..., :C] and
    v = SiLU(dwconv(gv[..., C:])), returned for the backward; else x is v itself and an empty tensor stands in
    for it (a custom op may not return its input). o: the pre-gate output with save_output and a gate, else an
    empty tensor."""
    if dwc_weight is None:
        v, v_out = x, x.new_empty((0,))
    else:
        C = x.shape[-1] // 2
        g = x[..., :C]
        v = v_out = dwconv_silu_fwd(x[..., C:], dwc_weight, dwc_bias, (H, W))
    y, kv, ksum, o = _qk_linear_attention_fwd(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight,
                                              out_bias, H, W, num_heads, gate_silu, scale, save_output)
    return y, v_out, kv, ksum, x.new_empty((0,)) if o is None else o


def _bwd(dy: Tensor, x: Tensor, g: Tensor | None, v: Tensor, dwc_weight: Tensor | None, dwc_bias: Tensor | None,
         qk_weight: Tensor, qk_bias: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor,
         out_weight: Tensor | None, out_bias: Tensor | None, scale: Tensor | None, kv: Tensor, ksum: Tensor,
         o: Tensor, H: int, W: int, num_heads: int, gate_silu: bool) -> tuple[Tensor, ...]:
    """(dx, dg, d dwc_weight, d dwc_bias, d qk_weight, d qk_bias, d lepe_weight, d lepe_bias, d out_weight,
    d out_bias); empty tensors stand in for what does not exist (dg and v without a gate or with dwc_weight,
    the dwc gradients without it).

    With dwc_weight, dx is d gv (B, N, 2C), written in place by its producers: the gate pass writes dg into its
    first C channels and do (which the attention's later passes read) into the last C, and once the attention's
    backward is done, the depthwise stencil's backward writes d u over do there; no concatenation of dg and d u,
    and no (B, N, C) do of its own. o: the forward's (empty when it kept none)."""
    o = o if o.numel() else None
    if dwc_weight is None:
        dv, dg, *grads = _qk_linear_attention_bwd(dy, x, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight,
                                                  out_bias, kv, ksum, H, W, num_heads, gate_silu, scale=scale, o=o)
        return (dv, dg, x.new_empty((0,)), x.new_empty((0,)), *grads)
    C = v.shape[-1]
    dx = _la._empty(x.shape, x.dtype, x.device)
    du = dx[..., C:]
    dv, _, *grads = _qk_linear_attention_bwd(dy, v, x[..., :C], qk_weight, qk_bias, lepe_weight, lepe_bias,
                                             out_weight, out_bias, kv, ksum, H, W, num_heads, gate_silu,
                                             dg=dx[..., :C], do=du, scale=scale, o=o)
    _, ddwc_weight, ddwc_bias = dwconv_silu_bwd(dv, x[..., C:], dwc_weight, dwc_bias, (H, W), out=du)
    return (dx, x.new_empty((0,)), ddwc_weight, ddwc_bias, *grads)


def _output_grad(dy: Tensor, out_weight: Tensor | None) -> Tensor:
    """da = dy W_out, the gradient of the attention's output through the output projection (dy without one)."""
    if out_weight is None:
        return dy
    with torch.autocast(dy.device.type, enabled=False):
        return (dy.reshape(-1, dy.shape[-1]) @ out_weight).view(dy.shape)


def _out_projection_grads(dy: Tensor, a: Tensor | None, out_weight: Tensor | None, out_bias: Tensor | None,
                          acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(d out_weight, d out_bias) in acc from dy and the rewritten output a; empty where there is no such
    parameter."""
    if out_weight is None:
        return dy.new_empty((0,), dtype=acc), dy.new_empty((0,), dtype=acc)
    dy2 = dy.reshape(-1, dy.shape[-1])
    return _projection_grads(dy2, a.view(-1, a.shape[-1]), out_bias is not None, acc)


def _projection_grads(dp: Tensor, v2: Tensor, bias: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dW, db) in dtype of one projection p = v W^T + b from dp, v (M, C); db empty without a bias."""
    dweight = matmul_to(dp.t(), v2, dtype)
    return dweight, (bias_grad(dp, dtype) if bias else dweight.new_empty((0,)))


_FWD_SCHEMA = "(Tensor x, Tensor? g, Tensor? dwc_weight, Tensor? dwc_bias, Tensor qk_weight, Tensor? qk_bias, " \
    "Tensor lepe_weight, Tensor lepe_bias, Tensor? out_weight, Tensor? out_bias, Tensor? scale, SymInt H, " \
    "SymInt W, int num_heads, bool gate_silu, bool save_output) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
_BWD_SCHEMA = "(Tensor dy, Tensor x, Tensor? g, Tensor v, Tensor? dwc_weight, Tensor? dwc_bias, Tensor qk_weight, " \
    "Tensor? qk_bias, Tensor lepe_weight, Tensor lepe_bias, Tensor? out_weight, Tensor? out_bias, Tensor? scale, " \
    "Tensor kv, Tensor ksum, Tensor o, SymInt H, SymInt W, int num_heads, bool gate_silu) " \
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

qk_linear_attention_fwd_op = torch.library.custom_op(
    "mlla_fast::qk_linear_attention_fwd", _fwd, mutates_args=(), schema=_FWD_SCHEMA)
qk_linear_attention_bwd_op = torch.library.custom_op(
    "mlla_fast::qk_linear_attention_bwd", _bwd, mutates_args=(), schema=_BWD_SCHEMA)


@qk_linear_attention_fwd_op.register_fake
def _(x, g, dwc_weight, dwc_bias, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, scale, H, W,
      num_heads, gate_silu, save_output):
    gated = g is not None or dwc_weight is not None
    if dwc_weight is None:
        y, kv, ksum = fake_fwd_outputs(x, num_heads)
        v_out = x.new_empty((0,))
    else:
        v_out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
        y, kv, ksum = fake_fwd_outputs(v_out, num_heads)
    return y, v_out, kv, ksum, y.new_empty(y.shape if save_output and gated else (0,))


@qk_linear_attention_bwd_op.register_fake
def _(dy, x, g, v, dwc_weight, dwc_bias, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, scale, kv,
      ksum, o, H, W, num_heads, gate_silu):
    acc = torch.promote_types(qk_weight.dtype, torch.float32)

    def grad(param: Tensor | None) -> Tensor:
        return qk_weight.new_empty((0,) if param is None else param.shape, dtype=acc)

    if dwc_weight is None:
        _, dx, dg, dlepe_w, dlepe_b = fake_bwd_outputs(x.dtype, x, g, lepe_weight, lepe_bias)
        ddwc_w, ddwc_b = x.new_empty((0,)), x.new_empty((0,))
    else:
        dx, dg, dlepe_w, dlepe_b = x.new_empty(x.shape), x.new_empty((0,)), torch.empty_like(lepe_weight), \
            torch.empty_like(lepe_bias)
        ddwc_w, ddwc_b = torch.empty_like(dwc_weight), torch.empty_like(dwc_bias)
    return (dx, dg, ddwc_w, ddwc_b, grad(qk_weight), grad(qk_bias), dlepe_w, dlepe_b, grad(out_weight),
            grad(out_bias))


class _QKLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor | None, dwc_weight: Tensor | None, dwc_bias: Tensor | None,
                qk_weight: Tensor, qk_bias: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor,
                out_weight: Tensor | None, out_bias: Tensor | None, residual: Tensor | None, scale: Tensor | None,
                H: int, W: int, num_heads: int, gate_silu: bool) -> Tensor:
        # the weights cast once per call, as F.linear under autocast would (autocast leaves custom ops alone)
        params = [None if p is None else cast(p, x.dtype) for p in (qk_weight, qk_bias, out_weight, out_bias)]
        # with a residual the op returns the attention's output a, and out_proj accumulates into the residual here
        inside = [None, None] if residual is not None else params[2:]
        y, v, kv, ksum, o = qk_linear_attention_fwd_op(x, g, dwc_weight, dwc_bias, params[0], params[1],
                                                       lepe_weight, lepe_bias, *inside, scale, H, W, num_heads,
                                                       gate_silu, SAVE_ATTENTION_OUTPUT)
        ctx.save_for_backward(x, g, v, dwc_weight, dwc_bias, *params, lepe_weight, lepe_bias, scale, kv, ksum, o)
        ctx.grid = (H, W, num_heads, gate_silu)
        ctx.param_dtypes = [None if p is None else p.dtype for p in (qk_weight, qk_bias, out_weight, out_bias)]
        ctx.residual = residual is not None
        ctx.set_materialize_grads(False)
        if residual is None:
            return y
        if torch.compiler.is_compiling():
            # out of place under torch.compile: Dynamo's autograd.Function capture could drop ctx.mark_dirty and
            # get the dirty input's gradient silently wrong until May 2026 (pytorch/pytorch#184113, fixed by #184267)
            return _accumulate_projection(residual.clone(), y, params[2], params[3])
        ctx.mark_dirty(residual)
        return _accumulate_projection(residual, y, params[2], params[3])

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None:  # the output took no gradient
            return (None,) * 16
        x, g, v, dwc_weight, dwc_bias, wc, bc, out_wc, out_bc, lepe_weight, lepe_bias, scale, kv, ksum, o = \
            ctx.saved_tensors
        need = ctx.needs_input_grad
        # No autocast context in this Function (the GEMMs run inside the op, autocast disabled there): under
        # torch.compile (PyTorch 2.13) one in the backward left autocast off for the rest of the traced forward,
        # whose MLP then ran in fp32.
        dx, dg, ddwc_w, ddwc_b, dweight, dbias, dlepe_w, dlepe_b, dout_w, dout_b = qk_linear_attention_bwd_op(
            dy, x, g, v, dwc_weight, dwc_bias, wc, bc, lepe_weight, lepe_bias, out_wc, out_bc, scale, kv, ksum, o,
            *ctx.grid)
        params = [(dweight, need[4]), (dbias, need[5]), (dout_w, need[8]), (dout_b, need[9])]
        dparams = [grad.to(dtype) if dtype is not None and needed else None
                   for (grad, needed), dtype in zip(params, ctx.param_dtypes, strict=True)]
        dwc = dwc_weight is not None
        return (dx if need[0] else None, dg if g is not None and need[1] else None,
                ddwc_w if dwc and need[2] else None, ddwc_b if dwc and need[3] else None, dparams[0], dparams[1],
                dlepe_w if need[6] else None, dlepe_b if need[7] else None, dparams[2], dparams[3],
                dy if ctx.residual and need[10] else None, None, None, None, None, None)


def _accumulate_projection(residual: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """residual += a W^T (+ bias), in place, and residual returned: one GEMM with beta = 1 into the residual
    itself, which cuBLAS reads and writes as its C operand (torch.addmm into a new tensor copies the residual
    there first: 0.17 ms of a 1024² block step on an H100)."""
    C = a.shape[-1]
    with torch.autocast(a.device.type, enabled=False):
        if residual.is_contiguous():
            residual.view(-1, C).addmm_(a.reshape(-1, C), weight.t())
        else:
            residual.add_(a @ weight.t())
        if bias is not None:
            residual.add_(bias)
    return residual


def qk_linear_attention(v: Tensor, g: Tensor | None, qk_weight: Tensor, qk_bias: Tensor | None, lepe_weight: Tensor,
                        lepe_bias: Tensor, hw: tuple[int, int], num_heads: int, gate_silu: bool = False,
                        out_weight: Tensor | None = None, out_bias: Tensor | None = None,
                        residual: Tensor | None = None) -> Tensor:
    """``linear_attention(linear(v, qk_weight, qk_bias), v, g, lepe_weight, lepe_bias, hw, num_heads, gate_silu)``
    (``kernels.linear_attention``, ``mlla_fast.linear``) with qk recomputed in the backward instead of saved,
    followed by ``linear(·, out_weight, out_bias)`` when out_weight is given (accumulated into residual, in place,
    when one is given), whose input (the attention's output) is rewritten by the backward's first pass instead
    of saved.

    Args:
        v: (B, N, C) the attention input, in the compute dtype (autocast's, else its own: float32, bfloat16
            or float16); token and batch strides are free.
        g: (B, N, C) gate like v, or None.
        qk_weight, qk_bias: (2C, C) and (2C,) or None, the qk projection (any float dtype; cast to v's).
        lepe_weight, lepe_bias, hw, num_heads, gate_silu: as for ``linear_attention``.
        out_weight, out_bias: (C, C) and (C,) or None, the output projection (any float dtype; cast to v's);
            out_bias only with out_weight.
        residual: (B, N, C) in v's dtype or None; only with out_weight. The output projection's GEMM accumulates
            into it in place (beta = 1: no separate add, no copy), and it is returned: like ``Tensor.add_``, it
            must not be a leaf that requires grad, and its old values are gone.

    Returns:
        (B, N, C) in v's dtype: residual itself when one is given.
    """
    if not isinstance(v, Tensor) or v.dim() != 3:
        raise ValueError(f"v: expected a 3-D (B, N, C) token tensor, got {_describe(v)}")
    B, N, C = v.shape
    _check_params(v, "v", qk_weight, qk_bias, out_weight, out_bias, residual)
    # the attention's own checks, with qk (computed from v in v's dtype) stood in for by a (B, N, 2C) view of v
    H, W = _check_inputs(v[..., :1].expand(B, N, 2 * C), v, g, lepe_weight, lepe_bias, hw, num_heads)
    return _QKLinearAttention.apply(v, g, None, None, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight,
                                    out_bias, residual, None, H, W, num_heads, bool(gate_silu))


def gv_linear_attention(gv: Tensor, dwc_weight: Tensor, dwc_bias: Tensor, qk_weight: Tensor,
                        qk_bias: Tensor | None, lepe_weight: Tensor, lepe_bias: Tensor, hw: tuple[int, int],
                        num_heads: int, out_weight: Tensor | None = None, out_bias: Tensor | None = None,
                        residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """The MLLA block's attention branch from its gate/value projection gv = [g, u] (B, N, 2C):
    ``qk_linear_attention(dwconv_silu(u, dwc_weight, dwc_bias, hw), g, ..., gate_silu=True, ...)``, the
    depthwise convolution (``kernels.dwconv``) inside the same Function, so that the backward writes the gate's
    gradient and u's straight into the halves of one (B, N, 2C) d gv: no concatenation of the two, and the
    attention backward's gated output gradient lives in d gv's u half until d u is written there.

    Args:
        gv: (B, N, 2C) in the compute dtype (as v for ``qk_linear_attention``), channels contiguous.
        dwc_weight, dwc_bias: (C, 1, 3, 3) and (C,) the depthwise convolution on u.
        qk_weight, ..., residual: as for ``qk_linear_attention``.
        scale: (B,) float32 or None, only with residual and without out_bias: a per-sample factor on the
            branch, ``residual += scale[b] * (a W_out^T)`` for sample b (drop-path's keep / (1 - p); the
            branch's bias goes to the residual scaled alike, e.g. by ``cpe_norm_linear``'s residual_bias and
            residual_scale). The output pass writes a scaled and its backward scales a's gradient: no
            elementwise pass of its own. Not differentiated.

    Returns:
        (B, N, C) in gv's dtype.
    """
    if not isinstance(gv, Tensor) or gv.dim() != 3 or gv.shape[-1] % 2:
        raise ValueError(f"gv: expected a 3-D (B, N, 2C) tensor, got {_describe(gv)}")
    C = gv.shape[-1] // 2
    _check_params(gv, "gv", qk_weight, qk_bias, out_weight, out_bias, residual, C)
    H, W = _check_stencil_inputs(gv[..., C:], hw, dwc_weight, {"dwc_bias": dwc_bias})
    # the attention's own checks, gv standing in for the (B, N, 2C) qk, its halves for v and g
    _check_inputs(gv, gv[..., C:], gv[..., :C], lepe_weight, lepe_bias, hw, num_heads)
    check_sample_scale(scale, gv, "scale", residual is not None and out_bias is None,
                       "a residual, or with out_bias (add the bias to the residual, scaled)")
    return _QKLinearAttention.apply(gv, None, dwc_weight, dwc_bias, qk_weight, qk_bias, lepe_weight, lepe_bias,
                                    out_weight, out_bias, residual, scale, H, W, num_heads, True)


def _check_params(x: Tensor, name: str, qk_weight: Tensor, qk_bias: Tensor | None, out_weight: Tensor | None,
                  out_bias: Tensor | None, residual: Tensor | None, C: int | None = None) -> None:
    """The checks qk_linear_attention and gv_linear_attention share: x in the compute dtype, the projections'
    shapes for C channels (x's last dimension by default), dtypes and devices, and the residual's."""
    dtype = compute_dtype(x)
    if x.dtype != dtype:
        raise ValueError(f"{name}: expected the compute dtype {dtype} (autocast's), got {x.dtype}")
    C = x.shape[-1] if C is None else C
    if out_weight is None and out_bias is not None:
        raise ValueError("out_bias: given without out_weight")
    if out_weight is None and residual is not None:
        raise ValueError("residual: given without out_weight")
    params = (("qk_weight", qk_weight, (2 * C, C)), ("qk_bias", qk_bias, (2 * C,)),
              ("out_weight", out_weight, (C, C)), ("out_bias", out_bias, (C,)))
    for pname, t, shape in params:
        if t is None and pname != "qk_weight":
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{pname}: expected shape {shape} for {name}'s {C} channels, got {_describe(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{pname}: expected a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{pname}: expected {name}'s device {x.device}, got {t.device}")
    if residual is not None:
        shape = (*x.shape[:-1], C)
        if not isinstance(residual, Tensor) or tuple(residual.shape) != shape or residual.dtype != x.dtype \
                or residual.device != x.device:
            got = f"{_describe(residual)}" + (f" {residual.dtype} on {residual.device}"
                                              if isinstance(residual, Tensor) else "")
            raise ValueError(f"residual: expected shape {shape} in {x.dtype} on {x.device}, got {got}")
        if residual.is_leaf and residual.requires_grad:
            raise ValueError("residual: the output projection accumulates into it in place, so it cannot be a leaf "
                             "that requires grad (pass residual.clone())")


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
