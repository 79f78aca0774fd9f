"""cpe_norm_linear (mlla_fast/norm_linear.py) against the two calls it replaces, cpe_residual_norm + linear.

Outputs and every gradient in fp32 (the project's fp32 rule) and under bf16 autocast (the low-precision rule
against the fp32 result, the two calls in bf16 standing in for PyTorch's own low-precision computation), with
and without a residual_bias (against r + residual_bias after the two calls); that residual_bias changes r
alone (h, y and the other gradients bitwise unchanged, r rounded once), also scaled per sample by a
residual_scale (drop-path's); the stencil backward's rewritten h against the forward's; that only x is saved,
eager and compiled; gradients of r or y alone; opcheck of the two custom ops and the input checks. Every
buffer the stencil kernels allocate is poisoned with NaN.
"""

import math

import pytest
import torch

from mlla_fast import norm_linear
from mlla_fast.kernels import dwconv
from mlla_fast.kernels.dwconv import cpe_residual_norm, cpe_residual_norm_bwd_h, cpe_residual_norm_fwd
from mlla_fast.linear import linear
from mlla_fast.norm_linear import cpe_norm_linear

from tolerance import FP32_RTOL, LOWP_FACTOR, LOWP_FLOOR, rel_err

B, H, W, C, M = 2, 5, 7, 64, 128
N = H * W
NAMES = ("x", "cpe_weight", "cpe_bias", "norm_weight", "norm_bias", "weight", "bias", "residual_bias")


@pytest.fixture(autouse=True)
def _poisoned_outputs(poison_outputs):
    poison_outputs(dwconv)


def make_leaves(device, bias=True, residual_bias=False):
    t = {
        "x": torch.randn(B, N, C, device=device) + 0.5,
        "cpe_weight": torch.randn(C, 1, 3, 3, device=device) * 0.3,
        "cpe_bias": torch.randn(C, device=device) * 0.5,
        "norm_weight": 1.0 + 0.5 * torch.randn(C, device=device),
        "norm_bias": 0.5 * torch.randn(C, device=device),
        "weight": torch.randn(M, C, device=device) / 8,
        "bias": torch.randn(M, device=device) if bias else None,
        "residual_bias": 0.5 * torch.randn(C, device=device) if residual_bias else None,
    }
    return {k: (x.requires_grad_() if x is not None else None) for k, x in t.items()}


def two_calls(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, residual_bias):
    r, h = cpe_residual_norm(x, cpe_weight, cpe_bias, norm_weight, norm_bias, (H, W))
    if residual_bias is not None:
        r = (r + residual_bias).to(r.dtype)  # r stays in x's dtype, as cpe_norm_linear's does
    return r, linear(h, weight, bias)


def one_function(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, residual_bias):
    return cpe_norm_linear(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, (H, W),
                           residual_bias=residual_bias)


def run(fn, leaves, dr, dy, dtype=None, frozen=()):
    """fn's outputs and the gradients of fresh copies of the leaves (those in frozen take none) for output
    gradients dr, dy (either may be None), under autocast to dtype (x cast to it first) when dtype is given."""
    fresh = {k: (x.detach().clone().requires_grad_(k not in frozen) if x is not None else None)
             for k, x in leaves.items()}
    with torch.autocast(dr.device.type if dr is not None else dy.device.type, dtype=dtype or torch.bfloat16,
                        enabled=dtype is not None):
        args = dict(fresh)
        if dtype is not None:
            args["x"] = fresh["x"].to(dtype)
        r, y = fn(*(args[k] for k in NAMES))
    used = [(o, g.to(o.dtype)) for o, g in ((r, dr), (y, dy)) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return (r.detach(), y.detach()), {k: x.grad for k, x in fresh.items() if x is not None and x.requires_grad}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual_bias", [False, True], ids=["no_residual_bias", "residual_bias"])
def test_matches_norm_then_linear(dtype, bias, residual_bias, device):
    leaves = make_leaves(device, bias, residual_bias)
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    outs_ref, grads_ref = run(two_calls, leaves, dr, dy, dtype)
    outs, grads = run(one_function, leaves, dr, dy, dtype)
    assert grads.keys() == grads_ref.keys() == {k for k in NAMES if leaves[k] is not None}
    for out, ref in zip(outs, outs_ref, strict=True):
        assert out.dtype == ref.dtype and out.shape == ref.shape
    if dtype is None:
        for name, out, ref in [("r", outs[0], outs_ref[0]), ("y", outs[1], outs_ref[1])]:
            assert rel_err(out, ref) <= FP32_RTOL, name
        for name, grad in grads.items():
            assert grad.dtype == torch.float32, name
            assert rel_err(grad, grads_ref[name]) <= FP32_RTOL, f"d{name}: one function != norm + linear"
        return
    outs32, grads32 = run(two_calls, leaves, dr, dy)
    pairs = [("r", outs[0], outs_ref[0], outs32[0]), ("y", outs[1], outs_ref[1], outs32[1])]
    pairs += [(k, grads[k], grads_ref[k], grads32[k]) for k in grads]
    for name, out, ref_lowp, ref32 in pairs:
        assert out.dtype == ref_lowp.dtype, name
        bound = LOWP_FACTOR * rel_err(ref_lowp, ref32) + LOWP_FLOOR[dtype]
        assert rel_err(out, ref32) <= bound, f"{name}: {rel_err(out, ref32):.2e} > {bound:.2e}"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_blocks_are_the_concatenated_weight(dtype, bias, device):
    """linear_weight and linear_bias given as row blocks (the block's gate and value projections) give bitwise
    the outputs of their concatenation, and each block the rows of the concatenation's gradient."""
    leaves = make_leaves(device, bias)
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    split = [M // 4, M - M // 4]

    def blocks(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, residual_bias):
        return cpe_norm_linear(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight.split(split),
                               None if bias is None else bias.split(split), (H, W))

    outs_ref, grads_ref = run(one_function, leaves, dr, dy, dtype)
    outs, grads = run(blocks, leaves, dr, dy, dtype)
    for out, ref in zip(outs, outs_ref, strict=True):
        assert torch.equal(out, ref)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ref[name]), name


def test_weight_blocks_bad_input(device):
    t = make_leaves(device)
    base = [t[k] for k in NAMES[:5]]
    w, b = t["weight"], t["bias"]
    with pytest.raises(ValueError, match="as many bias blocks"):
        cpe_norm_linear(*base, (w[:64], w[64:]), b, (H, W))
    with pytest.raises(ValueError, match="one or more weight blocks"):
        cpe_norm_linear(*base, (), None, (H, W))
    with pytest.raises(ValueError, match=r"linear_bias\[1\]: expected shape \(64,\)"):
        cpe_norm_linear(*base, (w[:64], w[64:]), (b[:64], b[:32]), (H, W))
    with pytest.raises(ValueError, match=r"linear_weight\[0\]: expected shape \(M, 64\)"):
        cpe_norm_linear(*base, (w[:64, :32], w[64:]), None, (H, W))


@pytest.mark.parametrize("which", ["r", "y"])
@pytest.mark.parametrize("residual_bias", [False, True], ids=["no_residual_bias", "residual_bias"])
def test_one_output_takes_gradient(which, residual_bias, device):
    """Only r or only y takes a gradient (the other's is None in the backward); residual_bias's gradient is
    zero when only y takes one."""
    leaves = make_leaves(device, residual_bias=residual_bias)
    dr = torch.randn(B, N, C, device=device) if which == "r" else None
    dy = torch.randn(B, N, M, device=device) if which == "y" else None
    _, grads_ref = run(two_calls, leaves, dr, dy)
    _, grads = run(one_function, leaves, dr, dy)
    for name, grad in grads.items():
        ref = grads_ref[name] if grads_ref[name] is not None else torch.zeros_like(grad)
        assert rel_err(grad, ref) <= FP32_RTOL or (ref.abs().max() == 0 and grad.abs().max() == 0), name
    if residual_bias and which == "y":
        assert grads["residual_bias"].shape == (C,) and not grads["residual_bias"].any()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_bias_changes_r_alone(dtype, device):
    """With residual_bias, y and every other gradient are bitwise those without it (h is the LayerNorm of r
    without the bias, and dr's sum is an accumulator of its own), and r comes back in x's dtype, in fp32 r +
    residual_bias exactly (bf16's single rounding: test_forward_kernel_adds_residual_bias_rounded_once)."""
    leaves = make_leaves(device, residual_bias=True)
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    outs, grads = run(one_function, leaves, dr, dy, dtype)
    outs0, grads0 = run(one_function, {**leaves, "residual_bias": None}, dr, dy, dtype)
    assert torch.equal(outs[1], outs0[1])
    assert grads.keys() - grads0.keys() == {"residual_bias"}
    for name, grad in grads0.items():
        assert torch.equal(grads[name], grad), f"d{name} changed by residual_bias"
    assert outs[0].dtype == outs0[0].dtype == (dtype or torch.float32)
    if dtype is None:
        assert torch.equal(outs[0], outs0[0] + leaves["residual_bias"].detach())


SAMPLE_SCALE = (0.0, 1.25)  # drop-path's factors: a dropped sample and a kept one, keep / (1 - p) with p = 0.2


def scaled_function(scale):
    def fn(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, residual_bias):
        return cpe_norm_linear(x, cpe_weight, cpe_bias, norm_weight, norm_bias, weight, bias, (H, W),
                               residual_bias=residual_bias, residual_scale=scale)
    return fn


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_scale_scales_the_bias_per_sample(dtype, device):
    """With residual_scale, sample b's r gets residual_scale[b] * residual_bias (fp32: r without the bias plus
    the scaled bias, to the fp32 rule), residual_bias's gradient is the scaled sum of dr (against float64), and y
    and every other gradient are bitwise those without the scale."""
    leaves = make_leaves(device, residual_bias=True)
    scale = torch.tensor(SAMPLE_SCALE, device=device)
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    outs, grads = run(scaled_function(scale), leaves, dr, dy, dtype)
    outs1, grads1 = run(one_function, leaves, dr, dy, dtype)
    assert torch.equal(outs[1], outs1[1])
    assert grads.keys() == grads1.keys()
    for name, grad in grads1.items():
        if name != "residual_bias":
            assert torch.equal(grads[name], grad), f"d{name} changed by residual_scale"
    dr_given = dr.to(dtype or torch.float32).double()  # run() hands the backward dr in r's dtype
    exact = (dr_given * scale.double()[:, None, None]).sum((0, 1))
    assert rel_err(grads["residual_bias"], exact) <= FP32_RTOL
    if dtype is None:
        outs0, _ = run(one_function, {**leaves, "residual_bias": None}, dr, dy)
        want = outs0[0] + scale[:, None, None] * leaves["residual_bias"].detach()
        assert rel_err(outs[0], want) <= FP32_RTOL
        assert torch.equal(outs[0][0], outs0[0][0])


def kernel_round(t, dtype):
    """The fp32 t rounded to dtype as the Triton kernels round (a GPU to nearest even; Triton's interpreter, at
    least some versions, towards zero): through ``reduce_partials``, a sum over one row."""
    (out,) = dwconv.reduce_partials(t.reshape(1, -1), [(tuple(t.shape), dtype)])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_kernel_adds_residual_bias_rounded_once(dtype, device):
    """cpe_residual_norm_fwd with residual_bias: h bitwise as without it, and r the fp32 r plus the bias rounded
    once to x's dtype (the fp32 r: the same kernel on x in fp32, whose stencil sums the same fp32 values in the
    same order)."""
    t = {k: x.detach() for k, x in make_leaves(device, residual_bias=True).items()}
    x = t["x"].to(dtype)
    params = [t[k] for k in ("cpe_weight", "cpe_bias", "norm_weight", "norm_bias")]
    r0, h0 = cpe_residual_norm_fwd(x, *params, (H, W))
    r, h = cpe_residual_norm_fwd(x, *params, (H, W), residual_bias=t["residual_bias"])
    assert torch.equal(h, h0)
    r32, _ = cpe_residual_norm_fwd(x.float(), *params, (H, W))
    assert torch.equal(kernel_round(r32, dtype), r0)
    assert r.dtype == dtype and torch.equal(r, kernel_round(r32 + t["residual_bias"], dtype))


def test_residual_bias_gradient_in_its_dtype(device):
    """residual_bias's gradient (dr summed over tokens, in fp32) comes back in residual_bias's dtype."""
    leaves = make_leaves(device, residual_bias=True)
    leaves["residual_bias"] = leaves["residual_bias"].detach().to(torch.bfloat16).requires_grad_()
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    _, grads = run(one_function, leaves, dr, dy)
    assert grads["residual_bias"].dtype == torch.bfloat16
    exact = dr.double().sum((0, 1))
    assert ((grads["residual_bias"].double() - exact).abs() <= torch.finfo(torch.bfloat16).eps * exact.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_rewrites_the_forward_h(dtype, device):
    """The stencil backward's h (WRITE_H, from its recomputed r) equals the forward kernel's h: to fp32's
    rule in fp32, and within one rounding step in bf16 (the two kernels sum the LayerNorm statistics in
    different orders)."""
    t = {k: (x.detach() if x is not None else None) for k, x in make_leaves(device).items()}
    x = t["x"].to(dtype)
    params = [t[k] for k in ("cpe_weight", "cpe_bias", "norm_weight", "norm_bias")]
    _, h = cpe_residual_norm_fwd(x, *params, (H, W))
    h_bwd = cpe_residual_norm_bwd_h(None, torch.randn_like(x), x, *params, (H, W), write_h=True)[5]
    assert h_bwd.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(h_bwd, h) <= FP32_RTOL
    else:
        ulp = torch.finfo(dtype).eps * h.float().abs().clamp_min(1e-3)
        assert ((h_bwd.float() - h.float()).abs() <= ulp).all()
    assert cpe_residual_norm_bwd_h(None, torch.randn_like(x), x, *params, (H, W))[5] is None


def _saved_shapes(fn, leaves):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*(leaves[k] for k in NAMES))
    return shapes


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_only_x_is_saved(compiled, device):
    """One (B, N, C) tensor (x) is kept for the backward, where the two calls keep x and h; also where
    AOTAutograd's partitioner picks what is saved (torch.compile)."""
    def compile_if(fn):
        return torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn

    def token_tensors(fn) -> int:  # (B, N, C) tensors, or views of them such as (B * N, C)
        return sum(math.prod(s) == B * N * C for s in _saved_shapes(compile_if(fn), make_leaves(device)))

    assert token_tensors(two_calls) == 2
    assert token_tensors(one_function) == 1


@pytest.mark.parametrize("residual_bias", [False, True], ids=["no_residual_bias", "residual_bias"])
def test_torch_compile_fullgraph(residual_bias, device):
    leaves = make_leaves(device, residual_bias=residual_bias)
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    outs_c, grads_c = run(torch.compile(one_function, fullgraph=True, backend="aot_eager"), leaves, dr, dy)
    outs_e, grads_e = run(one_function, leaves, dr, dy)
    for out_c, out_e in zip(outs_c, outs_e, strict=True):
        assert torch.equal(out_c, out_e)
    for name, grad in grads_e.items():
        assert torch.equal(grads_c[name], grad), f"d{name}: compiled != eager"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual_bias", [False, True], ids=["no_residual_bias", "residual_bias"])
def test_opcheck(bias, residual_bias, device):
    t = {k: (x.detach() if x is not None else None) for k, x in make_leaves(device, bias, residual_bias).items()}
    args = [t[k] for k in NAMES]
    scale = torch.tensor(SAMPLE_SCALE, device=device) if residual_bias else None
    torch.library.opcheck(norm_linear.cpe_norm_linear_fwd_op, (*args, scale, H, W, 1e-5))
    dr, dy = torch.randn(B, N, C, device=device), torch.randn(B, N, M, device=device)
    torch.library.opcheck(norm_linear.cpe_norm_linear_bwd_op,
                          (dr, dy, *args[:6], t["residual_bias"], scale, H, W, 1e-5, bias))


def test_bad_inputs(device):
    t = {k: (x.detach() if x is not None else None) for k, x in make_leaves(device).items()}
    base = [t[k] for k in NAMES[:5]]
    with pytest.raises(ValueError, match=r"linear_weight: expected shape \(M, 64\)"):
        cpe_norm_linear(*base, t["weight"][:, :32], t["bias"], (H, W))
    with pytest.raises(ValueError, match=r"linear_bias: expected shape \(128,\)"):
        cpe_norm_linear(*base, t["weight"], t["bias"][:64], (H, W))
    with pytest.raises(ValueError, match="linear_weight: expected a floating-point tensor"):
        cpe_norm_linear(*base, t["weight"].long(), t["bias"], (H, W))
    with pytest.raises(ValueError, match="token count 35 does not match the grid 5x6"):
        cpe_norm_linear(*base, t["weight"], t["bias"], (5, 6))
    rbias = torch.zeros(C, device=device)
    with pytest.raises(ValueError, match=r"residual_bias: expected shape \(64,\) for 64 channels, got \(32,\)"):
        cpe_norm_linear(*base, t["weight"], t["bias"], (H, W), residual_bias=rbias[:32])
    with pytest.raises(ValueError, match=r"residual_bias: expected shape \(64,\) for 64 channels, got \(1, 64\)"):
        cpe_norm_linear(*base, t["weight"], t["bias"], (H, W), residual_bias=rbias[None])
    with pytest.raises(ValueError, match=r"residual_bias: expected a floating-point tensor, got dtype torch\.int64"):
        cpe_norm_linear(*base, t["weight"], t["bias"], (H, W), residual_bias=rbias.long())
    with pytest.raises(ValueError, match=r"residual_bias: expected a torch\.Tensor, got float"):
        cpe_norm_linear(*base, t["weight"], t["bias"], (H, W), residual_bias=0.5)
    scale = torch.ones(B, device=device)
    with pytest.raises(ValueError, match="residual_scale: given without residual_bias"):
        cpe_norm_linear(*base, t["weight"], t["bias"], (H, W), residual_scale=scale)
    for bad in (scale[:1], scale.bfloat16(), scale[None], 1.0):
        with pytest.raises(ValueError, match=r"residual_scale: expected a float32 tensor of shape \(2,\)"):
            cpe_norm_linear(*base, t["weight"], t["bias"], (H, W), residual_bias=rbias, residual_scale=bad)
