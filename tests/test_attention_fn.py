"""qk_linear_attention (mlla_fast/attention.py) against the two calls it replaces, linear + linear_attention.

Output and every gradient on a small odd grid in fp32 (the project's fp32 rule: the q and k projections and
their gradients are separate GEMMs, and dv is summed in another order) and under bf16/fp16 autocast (the
low-precision rule against the fp32 result, the two calls in that dtype standing in for PyTorch's own
low-precision computation: dv is rounded in other places); with the output projection inside, against the
Function followed by linear; that no (B, N, 2C) tensor is saved for the backward, eager or compiled; partial
requires_grad, torch.compile, opcheck of the two custom ops and the input checks. gv_linear_attention against
dwconv_silu followed by the Function, and a residual added by out_proj's GEMM against one added after it, also
with a per-sample scale of the branch (drop-path's).
"""

import math

import pytest
import torch

from mlla_fast import attention
from mlla_fast.attention import qk_linear_attention
from mlla_fast.kernels import dwconv
from mlla_fast.kernels import linear_attention as la
from mlla_fast.linear import compute_dtype, linear

from tolerance import FP32_RTOL, LOWP_FACTOR, LOWP_FLOOR, rel_err

B, H, W, C, HEADS = 2, 5, 7, 64, 2
N = H * W
NAMES = ("v", "g", "qk_weight", "qk_bias", "lepe_weight", "lepe_bias")


@pytest.fixture(autouse=True)
def _poisoned_outputs(poison_outputs):
    poison_outputs(la, dwconv)


def make_leaves(device, bias=True):
    """fp32 leaves: v, g (B, N, C), the qk projection (2C, C), (2C,) and the LePE's (C, 1, 3, 3), (C,)."""
    t = {
        "v": torch.randn(B, N, C, device=device),
        "g": torch.randn(B, N, C, device=device),
        "qk_weight": torch.randn(2 * C, C, device=device) / 8,
        "qk_bias": torch.randn(2 * C, device=device) / 4 if bias else None,
        "lepe_weight": torch.randn(C, 1, 3, 3, device=device) / 3,
        "lepe_bias": torch.randn(C, device=device),
    }
    return {k: (x.requires_grad_() if x is not None else None) for k, x in t.items()}


def two_calls(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias):
    qk = linear(v, qk_weight, qk_bias)
    return la.linear_attention(qk, v, g, lepe_weight, lepe_bias, (H, W), HEADS, gate_silu=True)


def one_function(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias):
    return qk_linear_attention(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, (H, W), HEADS, gate_silu=True)


def out_projected_leaves(device, bias=True):
    """make_leaves plus the output projection: out_weight (C, C), out_bias (C,) or None."""
    t = make_leaves(device, bias)
    t["out_weight"] = (torch.randn(C, C, device=device) / 8).requires_grad_()
    t["out_bias"] = torch.randn(C, device=device).requires_grad_() if bias else None
    return t


def attention_then_out_proj(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias):
    return linear(one_function(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias), out_weight, out_bias)


def one_function_out_proj(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias):
    return qk_linear_attention(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, (H, W), HEADS, gate_silu=True,
                               out_weight=out_weight, out_bias=out_bias)


def run(fn, leaves, dy, dtype=None, frozen=()):
    """fn's output and the gradients of fresh copies of the leaves (those in frozen take none), under autocast
    to dtype (v and g cast to it first, as the block's activations are) when dtype is given."""
    fresh = {k: (x.detach().clone().requires_grad_(k not in frozen) if x is not None else None)
             for k, x in leaves.items()}
    device = dy.device.type
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        args = dict(fresh)
        if dtype is not None:
            args["v"], args["g"] = fresh["v"].to(dtype), fresh["g"].to(dtype)
        y = fn(*(args[k] for k in leaves))
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: x.grad for k, x in fresh.items() if x is not None and x.requires_grad}


@pytest.fixture(params=["recompute_o", "save_o"])
def gate_pass(request, monkeypatch):
    """Both of the backward's gate passes: the output pass again, or element-wise from the forward's saved
    pre-gate output (SAVE_ATTENTION_OUTPUT)."""
    monkeypatch.setattr(attention, "SAVE_ATTENTION_OUTPUT", request.param == "save_o")
    return request.param


@pytest.fixture(params=["packed", "split"])
def qk_path(request, monkeypatch):
    """Both of the backward's paths: qk and dqk whole (small v) or q and k one at a time (large v)."""
    monkeypatch.setattr(attention, "SPLIT_QK_BYTES", 0 if request.param == "split" else 1 << 62)
    return request.param


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_then_attention(dtype, bias, qk_path, device):
    leaves = make_leaves(device, bias)
    dy = torch.randn(B, N, C, device=device)
    y_ref, grads_ref = run(two_calls, leaves, dy, dtype)
    y, grads = run(one_function, leaves, dy, dtype)
    assert y.dtype == y_ref.dtype == (dtype or torch.float32)
    assert grads.keys() == grads_ref.keys() == {k for k in NAMES if leaves[k] is not None}
    if dtype is None:
        assert rel_err(y, y_ref) <= FP32_RTOL
        for name, grad in grads.items():
            assert grad.dtype == grads_ref[name].dtype == torch.float32, name
            assert rel_err(grad, grads_ref[name]) <= FP32_RTOL, f"d{name}: one function != linear + linear_attention"
        return
    y32, grads32 = run(two_calls, leaves, dy)
    for name, out, ref_lowp, ref32 in [("y", y, y_ref, y32)] + [(k, grads[k], grads_ref[k], grads32[k]) for k in grads]:
        assert out.dtype == ref_lowp.dtype, name
        bound = LOWP_FACTOR * rel_err(ref_lowp, ref32) + LOWP_FLOOR[dtype]
        assert rel_err(out, ref32) <= bound, f"{name}: {rel_err(out, ref32):.2e} > {bound:.2e}"


@pytest.mark.parametrize("frozen", [("v",), ("qk_weight", "qk_bias"), ("v", "g", "lepe_weight", "lepe_bias")])
def test_partial_gradients(frozen, qk_path, device):
    """Inputs that take no gradient get none; the others' gradients are unchanged."""
    leaves = make_leaves(device)
    dy = torch.randn(B, N, C, device=device)
    _, grads_ref = run(two_calls, leaves, dy, frozen=frozen)
    _, grads = run(one_function, leaves, dy, frozen=frozen)
    assert grads.keys() == grads_ref.keys() == set(NAMES) - set(frozen)
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) <= FP32_RTOL, name


def assert_matches(got, want, dtype, want32, what):
    """got and want, (output, gradients by name), of a Function and of the composition it replaces, in dtype:
    fp32 (dtype None) to the fp32 rule; a low-precision dtype to the low-precision rule against want32(), the
    composition in fp32."""
    (y, grads), (y_ref, grads_ref) = got, want
    if dtype is None:
        assert rel_err(y, y_ref) <= FP32_RTOL
        for name, grad in grads.items():
            assert grad.dtype == torch.float32, name
            assert rel_err(grad, grads_ref[name]) <= FP32_RTOL, f"d{name}: {what}"
        return
    y32, grads32 = want32()
    pairs = [("y", y, y_ref, y32)] + [(k, grads[k], grads_ref[k], grads32[k]) for k in grads]
    for name, out, ref_lowp, ref32 in pairs:
        assert out.dtype == ref_lowp.dtype, name
        bound = LOWP_FACTOR * rel_err(ref_lowp, ref32) + LOWP_FLOOR[dtype]
        assert rel_err(out, ref32) <= bound, f"{name}: {rel_err(out, ref32):.2e} > {bound:.2e}"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_out_projection(dtype, bias, qk_path, device):
    """With out_weight/out_bias the Function equals itself followed by linear (output and every gradient;
    fp32 to the fp32 rule, bf16 to the low-precision rule against fp32), and the attention's gated output is
    rewritten by the backward instead of saved."""
    leaves = out_projected_leaves(device, bias)
    dy = torch.randn(B, N, C, device=device)
    y_ref, grads_ref = run(attention_then_out_proj, leaves, dy, dtype)
    y, grads = run(one_function_out_proj, leaves, dy, dtype)
    assert grads.keys() == grads_ref.keys() == {k for k, x in leaves.items() if x is not None}
    assert_matches((y, grads), (y_ref, grads_ref), dtype, lambda: run(attention_then_out_proj, leaves, dy),
                   "out_proj inside != linear after")
    shapes = _saved_shapes(one_function_out_proj, leaves, dtype)
    pre_gate = int(attention.SAVE_ATTENTION_OUTPUT)  # the pre-gate output, kept for the element-wise gate pass
    assert shapes.count((B, N, C)) == 2 + pre_gate, shapes  # v and g; the linear after also keeps the output
    assert _saved_shapes(attention_then_out_proj, leaves, dtype).count((B, N, C)) == 3 + pre_gate


def test_out_projection_partial_gradients(qk_path, device):
    """A frozen output projection takes no gradient; the rest are unchanged."""
    leaves = out_projected_leaves(device)
    dy = torch.randn(B, N, C, device=device)
    frozen = ("out_weight", "out_bias", "v")
    _, grads_ref = run(attention_then_out_proj, leaves, dy, frozen=frozen)
    _, grads = run(one_function_out_proj, leaves, dy, frozen=frozen)
    assert grads.keys() == grads_ref.keys() == set(leaves) - set(frozen)
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name]) <= FP32_RTOL, name


def _saved_shapes(fn, leaves, dtype=None) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(leaves["v"].device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        v, g = (leaves["v"].to(dtype), leaves["g"].to(dtype)) if dtype is not None else (leaves["v"], leaves["g"])
        fn(v, g, *(x for k, x in leaves.items() if k not in ("v", "g")))
    return shapes


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_qk_is_not_saved(dtype, compiled, qk_path, device):
    """No (B, N, 2C) tensor is kept for the backward (the two calls keep qk), also where AOTAutograd's
    partitioner picks what is saved (torch.compile)."""
    def compile_if(fn):
        return torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn

    leaves = make_leaves(device)
    assert (B, N, 2 * C) in _saved_shapes(compile_if(two_calls), leaves, dtype)
    shapes = _saved_shapes(compile_if(one_function), leaves, dtype)
    assert (B, N, C) in shapes
    assert not [s for s in shapes if s[-1] == 2 * C and math.prod(s) >= N * 2 * C], shapes


def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces the Function (forward, recompute, the custom ops) without breaks."""
    leaves = make_leaves(device)
    dy = torch.randn(B, N, C, device=device)
    y_c, grads_c = run(torch.compile(one_function, fullgraph=True, backend="aot_eager"), leaves, dy)
    y_e, grads_e = run(one_function, leaves, dy)
    assert torch.equal(y_c, y_e)
    for name, grad in grads_e.items():
        assert torch.equal(grads_c[name], grad), f"d{name}: compiled != eager"


def test_torch_compile_keeps_autocast_after_the_function(device):
    """Under torch.compile and autocast, code traced after the Function still sees autocast on (an autocast
    context in its backward once left it off for the rest of the traced forward: the block's MLP, which picks
    its dtype with compute_dtype, then ran in fp32)."""
    def attention_then_cast(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias):
        y = one_function(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias).float()
        return y.to(compute_dtype(y))

    leaves = make_leaves(device)
    dy = torch.randn(B, N, C, device=device)
    y_c, _ = run(torch.compile(attention_then_cast, fullgraph=True, backend="aot_eager"), leaves, dy, torch.bfloat16)
    y_e, _ = run(attention_then_cast, leaves, dy, torch.bfloat16)
    assert y_c.dtype == y_e.dtype == torch.bfloat16
    assert torch.equal(y_c, y_e)


# (gate, out, save_output): every gate and output with the output pass recomputed in the backward; the saved
# pre-gate output (SAVE_ATTENTION_OUTPUT) on the gated paths the block and the tests of the Function take
OPCHECK_CASES = [(gate, out, False) for gate in ("gate", "no_gate", "gv")
                 for out in ("out_proj", "residual", "no_out_proj")]
OPCHECK_CASES += [("gv", "residual", True), ("gate", "out_proj", True)]


@pytest.mark.parametrize(("gate", "out", "save_output"), OPCHECK_CASES, ids=lambda c: str(c))
def test_opcheck(gate, out, save_output, qk_path, device):
    t = {k: x.detach() for k, x in make_leaves(device).items()}
    g = t["g"] if gate == "gate" else None
    x, dwc_w, dwc_b = t["v"], None, None
    if gate == "gv":
        x = torch.cat([t["g"], t["v"]], dim=-1)
        dwc_w, dwc_b = torch.randn(C, 1, 3, 3, device=device) / 3, torch.randn(C, device=device)
    out_w, out_b = (torch.randn(C, C, device=device) / 8, torch.randn(C, device=device)) \
        if out != "no_out_proj" else (None, None)
    params = (t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], out_w, out_b)
    # with a residual, the forward op leaves out_proj to the Function (which accumulates into the residual)
    fwd_params = (*params[:4], None, None) if out == "residual" else params
    # the gv path takes drop-path's per-sample scale of the branch (with a residual and no out_bias in the
    # Function; the ops themselves take any scale with a gate)
    scale = torch.tensor([0.0, 1.25], device=device) if gate == "gv" else None
    args = (x, g, dwc_w, dwc_b, *fwd_params, scale, H, W, HEADS, True, save_output)
    torch.library.opcheck(attention.qk_linear_attention_fwd_op, args)
    y, v, kv, ksum, o = attention.qk_linear_attention_fwd_op(*args)
    assert o.shape == ((B, N, C) if save_output and gate != "no_gate" else (0,))
    torch.library.opcheck(attention.qk_linear_attention_bwd_op,
                          (torch.randn_like(y), x, g, v, dwc_w, dwc_b, *params, scale, kv, ksum, o, H, W, HEADS, True))


def gv_leaves(device, bias=True):
    """out_projected_leaves plus the value's depthwise convolution dwc_weight (C, 1, 3, 3), dwc_bias (C,) and a
    residual (B, N, C); v stands for u, the convolution's input."""
    t = out_projected_leaves(device, bias)
    t["dwc_weight"] = (torch.randn(C, 1, 3, 3, device=device) / 3).requires_grad_()
    t["dwc_bias"] = torch.randn(C, device=device).requires_grad_()
    t["residual"] = torch.randn(B, N, C, device=device).requires_grad_()
    return t


def gv_composed(u, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, dwc_weight, dwc_bias,
                residual):
    v = dwconv.dwconv_silu(u, dwc_weight, dwc_bias, (H, W))
    return residual + one_function_out_proj(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias)


def gv_one_function(u, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, dwc_weight, dwc_bias,
                    residual):
    gv = torch.cat([g, u], dim=-1)
    return attention.gv_linear_attention(gv, dwc_weight, dwc_bias, qk_weight, qk_bias, lepe_weight, lepe_bias, (H, W),
                                         HEADS, out_weight=out_weight, out_bias=out_bias, residual=residual)


def residual_one_function(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, dwc_weight,
                          dwc_bias, residual):
    return qk_linear_attention(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, (H, W), HEADS, gate_silu=True,
                               out_weight=out_weight, out_bias=out_bias, residual=residual)


def residual_composed(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, dwc_weight, dwc_bias,
                      residual):
    return residual + one_function_out_proj(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias)


def _run_with_residual(fn, leaves, dy, dtype=None):
    """run() with the residual cast to the compute dtype as well (it must be in v's dtype), a copy: the Function
    accumulates into it in place."""
    def wrapped(v, g, *rest):
        *params, residual = rest
        return fn(v, g, *params, residual.to(v.dtype).clone())

    return run(wrapped, leaves, dy, dtype)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("fn", "ref"), [(gv_one_function, gv_composed), (residual_one_function, residual_composed)],
                         ids=["gv", "residual"])
@pytest.mark.parametrize("bias", [True, False])
def test_gv_and_residual(fn, ref, dtype, bias, qk_path, gate_pass, device):
    """gv_linear_attention (the value's convolution inside the Function, d gv written in place) equals
    dwconv_silu followed by the Function; a residual added by out_proj's GEMM equals one added after it. Output
    and every gradient (d gv's halves are d g and d u), fp32 to the fp32 rule, bf16 to the low-precision rule
    against fp32; the residual's gradient is the output's."""
    leaves = gv_leaves(device, bias)
    if fn is residual_one_function:
        leaves["dwc_weight"] = leaves["dwc_bias"] = None
    dy = torch.randn(B, N, C, device=device)
    y_ref, grads_ref = _run_with_residual(ref, leaves, dy, dtype)
    y, grads = _run_with_residual(fn, leaves, dy, dtype)
    assert grads.keys() == grads_ref.keys() == {k for k, x in leaves.items() if x is not None}
    assert_matches((y, grads), (y_ref, grads_ref), dtype, lambda: _run_with_residual(ref, leaves, dy),
                   "one Function != composed")
    if dtype is None:
        assert torch.equal(grads["residual"], dy)


SAMPLE_SCALE = (0.0, 1.25)  # drop-path's factors: a dropped sample and a kept one, keep / (1 - p) with p = 0.2


def _scaled(fn, scale):
    def scaled(*args):
        return fn(*args, scale=torch.tensor(scale, device=args[0].device))
    return scaled


def gv_composed_scaled(u, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, dwc_weight, dwc_bias,
                       residual, scale):
    v = dwconv.dwconv_silu(u, dwc_weight, dwc_bias, (H, W))
    y = one_function_out_proj(v, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias)
    return residual + y * scale.to(y.dtype)[:, None, None]


def gv_one_function_scaled(u, g, qk_weight, qk_bias, lepe_weight, lepe_bias, out_weight, out_bias, dwc_weight,
                           dwc_bias, residual, scale):
    gv = torch.cat([g, u], dim=-1)
    return attention.gv_linear_attention(gv, dwc_weight, dwc_bias, qk_weight, qk_bias, lepe_weight, lepe_bias, (H, W),
                                         HEADS, out_weight=out_weight, out_bias=out_bias, residual=residual,
                                         scale=scale)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_gv_per_sample_scale(dtype, qk_path, gate_pass, device):
    """gv_linear_attention with a per-sample scale (drop-path's factor, applied by the output pass and its
    backward) equals the residual plus the scaled branch: output and every gradient, fp32 to the fp32 rule,
    bf16 to the low-precision rule against fp32; a dropped sample's branch gradients are zero."""
    leaves = gv_leaves(device, bias=False)
    dy = torch.randn(B, N, C, device=device)
    ref = _scaled(gv_composed_scaled, SAMPLE_SCALE)
    y_ref, grads_ref = _run_with_residual(ref, leaves, dy, dtype)
    y, grads = _run_with_residual(_scaled(gv_one_function_scaled, SAMPLE_SCALE), leaves, dy, dtype)
    assert grads.keys() == grads_ref.keys() == {k for k, x in leaves.items() if x is not None}
    assert_matches((y, grads), (y_ref, grads_ref), dtype, lambda: _run_with_residual(ref, leaves, dy),
                   "scaled Function != residual + scaled branch")
    assert not grads["v"][0].any() and not grads["g"][0].any() and grads["v"][1].any()
    if dtype is None:
        assert torch.equal(grads["residual"], dy)


def test_residual_is_accumulated_in_place(device):
    """With a residual the Function returns the residual tensor itself, out_proj's output added into it (no new
    tensor, no copy); a leaf that requires grad is refused, as Tensor.add_ would refuse it."""
    t = {k: (x.detach() if x is not None else None) for k, x in gv_leaves(device).items()}
    residual = t["residual"].clone()
    args = (t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], t["out_weight"],
            t["out_bias"], None, None)
    y = residual_one_function(*args, residual)
    assert y is residual
    want = t["residual"] + one_function_out_proj(*args[:8])
    assert rel_err(y, want) <= FP32_RTOL
    with pytest.raises(ValueError, match="residual: the output projection accumulates into it in place"):
        residual_one_function(*args, t["residual"].clone().requires_grad_())


def test_saved_pre_gate_output(monkeypatch, device):
    """With SAVE_ATTENTION_OUTPUT, gv_linear_attention keeps one (B, N, C) tensor more, the pre-gate output."""
    leaves = {k: x for k, x in gv_leaves(device).items() if k != "residual"}
    counts = []
    for save in (False, True):
        monkeypatch.setattr(attention, "SAVE_ATTENTION_OUTPUT", save)
        shapes = _saved_shapes(lambda u, g, *rest: gv_one_function(u, g, *rest, None), leaves)
        counts.append(shapes.count((B, N, C)))
    assert counts == [1, 2], counts


def test_gv_saves_no_concatenation(device):
    """gv_linear_attention keeps gv, v and the state for its backward (as dwconv_silu and the Function apart did,
    gv's halves being views of it), and its d gv is one tensor: no (B, N, C) tensor the size of a half beyond v
    and, with SAVE_ATTENTION_OUTPUT (the default), the pre-gate output."""
    leaves = {k: x for k, x in gv_leaves(device).items() if k != "residual"}
    shapes = _saved_shapes(lambda u, g, *rest: gv_one_function(u, g, *rest, None), leaves)
    assert shapes.count((B, N, 2 * C)) == 1, shapes
    assert shapes.count((B, N, C)) == 1 + attention.SAVE_ATTENTION_OUTPUT, shapes


def test_bad_inputs(device):
    t = {k: x.detach() for k, x in make_leaves(device).items()}
    with pytest.raises(ValueError, match=r"qk_weight: expected shape \(128, 64\)"):
        one_function(t["v"], t["g"], t["qk_weight"][:64], t["qk_bias"], t["lepe_weight"], t["lepe_bias"])
    with pytest.raises(ValueError, match=r"qk_bias: expected shape \(128,\)"):
        one_function(t["v"], t["g"], t["qk_weight"], t["qk_bias"][:64], t["lepe_weight"], t["lepe_bias"])
    with pytest.raises(ValueError, match="qk_weight: expected a floating-point tensor"):
        one_function(t["v"], t["g"], t["qk_weight"].long(), t["qk_bias"], t["lepe_weight"], t["lepe_bias"])
    with pytest.raises(ValueError, match="v: expected a 3-D"):
        one_function(t["v"][0], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"])
    with pytest.raises(ValueError, match=r"v: expected the compute dtype torch\.bfloat16"), \
            torch.autocast(device, dtype=torch.bfloat16):
        one_function(t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"])
    with pytest.raises(ValueError, match="g: expected the activation dtype of v"):
        one_function(t["v"], t["g"].bfloat16(), t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"])
    with pytest.raises(ValueError, match=r"out_weight: expected shape \(64, 64\)"):
        qk_linear_attention(t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], (H, W),
                            HEADS, out_weight=t["qk_weight"])
    with pytest.raises(ValueError, match="out_bias: given without out_weight"):
        qk_linear_attention(t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], (H, W),
                            HEADS, out_bias=t["lepe_bias"])
    with pytest.raises(ValueError, match="token count 35 does not match the grid 5x6"):
        qk_linear_attention(t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], (5, 6),
                            HEADS)
    with pytest.raises(ValueError, match="residual: given without out_weight"):
        qk_linear_attention(t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], (H, W),
                            HEADS, residual=t["v"])
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 35, 64\) in torch\.float32"):
        qk_linear_attention(t["v"], t["g"], t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], (H, W),
                            HEADS, out_weight=t["qk_weight"][:C], residual=t["v"].bfloat16())
    gv = torch.cat([t["g"], t["v"]], dim=-1)
    dwc_w, dwc_b = t["lepe_weight"], t["lepe_bias"]
    with pytest.raises(ValueError, match=r"gv: expected a 3-D \(B, N, 2C\) tensor"):
        attention.gv_linear_attention(gv[..., 1:], dwc_w, dwc_b, t["qk_weight"], t["qk_bias"], t["lepe_weight"],
                                      t["lepe_bias"], (H, W), HEADS)
    with pytest.raises(ValueError, match=r"qk_weight: expected shape \(128, 64\) for gv's 64 channels"):
        attention.gv_linear_attention(gv, dwc_w, dwc_b, t["qk_weight"][:C], t["qk_bias"], t["lepe_weight"],
                                      t["lepe_bias"], (H, W), HEADS)
    with pytest.raises(ValueError, match="dwc_bias"):
        attention.gv_linear_attention(gv, dwc_w, dwc_b[:32], t["qk_weight"], t["qk_bias"], t["lepe_weight"],
                                      t["lepe_bias"], (H, W), HEADS)
    out_w, scale = t["qk_weight"][:C], torch.ones(B, device=device)
    args = (gv, dwc_w, dwc_b, t["qk_weight"], t["qk_bias"], t["lepe_weight"], t["lepe_bias"], (H, W), HEADS)
    with pytest.raises(ValueError, match="scale: given without a residual"):
        attention.gv_linear_attention(*args, out_weight=out_w, scale=scale)
    with pytest.raises(ValueError, match="scale: given without a residual, or with out_bias"):
        attention.gv_linear_attention(*args, out_weight=out_w, out_bias=t["lepe_bias"], residual=t["v"].clone(),
                                      scale=scale)
    for bad in (scale[:1], scale.double(), scale[:, None]):
        with pytest.raises(ValueError, match=r"scale: expected a float32 tensor of shape \(2,\), one factor per "
                                             r"sample"):
            attention.gv_linear_attention(*args, out_weight=out_w, residual=t["v"].clone(), scale=bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [64, 96])
def test_reduction_projects_k(dtype, bias, channels, device):
    """attention_state with k projected inside the kernel (``Projected``: C/32 input chunks, rounded to the
    activation dtype as the GEMM's output) equals attention_state of the GEMM's k: in fp32 to the fp32 rule, in
    bf16/fp16 within the low-precision floor of the state computed from the GEMM's k (the two roundings of k
    may differ by one unit in the last place)."""
    heads = channels // 32
    v = torch.randn(B, N, channels, device=device).to(dtype)
    weight = (torch.randn(channels, channels, device=device) / 8).to(dtype)
    b = (torch.randn(channels, device=device) / 4).to(dtype) if bias else None
    with torch.autocast(device, enabled=False):
        k = torch.nn.functional.linear(v, weight, b)
    kv_ref, ksum_ref = la.attention_state(k, v, W, heads)
    kv, ksum = la.attention_state(la.Projected(v, weight, b), v, W, heads)
    bound = FP32_RTOL if dtype == torch.float32 else LOWP_FLOOR[dtype]
    assert rel_err(kv, kv_ref) <= bound and rel_err(ksum, ksum_ref) <= bound
