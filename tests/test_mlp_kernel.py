"""The Triton MLP (kernels/mlp.py): ``residual + scale[b] * fc2(GELU(fc1(x)))`` with the hidden layer on chip.

Output and every gradient (x, both weights and biases, the residual) against a float64 autograd reference
on fresh random inputs: fp32 to 1e-5, bf16/fp16 by the project's rule (at most twice PyTorch's own error
in that dtype, plus a floor). Odd token counts and hidden widths that are no multiple of the kernels'
blocks, C = 32/64/96/128, both GELU forms, strided and expanded tensors, programs walking several token
blocks, drop-path's per-sample scale (dropped and kept samples, token blocks straddling two samples),
determinism, torch.compile and the input checks. Every buffer the kernels allocate is poisoned
with NaN, so an element a kernel fails to write fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from conftest import DEVICE

from mlla_fast.kernels import dwconv
from mlla_fast.kernels import mlp as kmlp
from mlla_fast.kernels.mlp import mlp
from mlla_fast.mlp import TRITON_MLP_MAX_CHANNELS, triton_mlp_supported
from mlla_fast.reference.block import Mlp

from tolerance import assert_matches


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(kmlp, dwconv)


def _reference(x, w1, b1, w2, b2, approximate, residual, scale=None):
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    if scale is not None:
        y = y * scale.to(y.dtype).reshape(-1, *(1,) * (y.dim() - 1))
    return y if residual is None else y + residual


def _inputs(M, C, HID, device, scale=1.0, residual=True, x_dtype=torch.float32, param_dtype=torch.float32):
    """x (M, C), or (B, N, C) for M = (B, N), its weights and biases and a residual of x's shape (or None)."""
    tokens = tuple(M) if isinstance(M, tuple) else (M,)
    x = (torch.randn(*tokens, C, device=device) * scale).to(x_dtype)
    w1 = (torch.randn(HID, C, device=device) / C**0.5).to(param_dtype)
    b1 = (torch.randn(HID, device=device) * 0.5).to(param_dtype)
    w2 = (torch.randn(C, HID, device=device) / HID**0.5).to(param_dtype)
    b2 = (torch.randn(C, device=device) * 0.5).to(param_dtype)
    res = torch.randn(*tokens, C, device=device).to(x_dtype) if residual else None
    return [x, w1, b1, w2, b2, res]


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    return y, torch.autograd.grad(y, present, dy.to(y.dtype))


NAMES = ["x", "w1", "b1", "w2", "b2", "residual"]


def _check(tensors, approximate, dtype, device, dy=None, scale=None):
    """The kernels' output and gradients in dtype against float64 (and against PyTorch in dtype for bf16/fp16);
    scale: None or drop-path's per-sample factor (B,) for x (B, N, C). Returns the output and gradients."""
    dy = torch.randn(tensors[0].shape, device=device) if dy is None else dy
    y, grads = _grads(lambda *t: mlp(*t[:5], approximate, t[5], scale, dtype=dtype), tensors, dy)
    t64 = [t.double() if t is not None else None for t in tensors]
    y64, grads64 = _grads(lambda *t: _reference(*t[:5], approximate, t[5], scale), t64, dy.double())
    lowp = None
    if dtype != torch.float32:
        tl_ = [t.to(dtype) if t is not None else None for t in tensors]
        lowp = _grads(lambda *t: _reference(*t[:5], approximate, t[5], scale), tl_, dy.to(dtype))
    names = [n for n, t in zip(NAMES, tensors, strict=True) if t is not None]
    assert y.dtype == (dtype if tensors[5] is None else torch.promote_types(dtype, tensors[5].dtype))
    assert_matches("y", y, y64, None if lowp is None else lowp[0], dtype)
    for i, (name, g, g64) in enumerate(zip(names, grads, grads64, strict=True)):
        assert g.dtype == tensors[NAMES.index(name)].dtype, name
        assert_matches(f"d{name}", g, g64, None if lowp is None else lowp[1][i], dtype)
    return y, dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize(("M", "C", "HID"), [(1, 32, 128), (37, 64, 256), (70, 96, 384), (33, 128, 512),
                                             (45, 64, 100), (29, 32, 8)])
def test_fp32_matches_float64(M, C, HID, approximate, device):
    _check(_inputs(M, C, HID, device, scale=2.0), approximate, torch.float32, device)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_reference_rule(dtype, residual, device):
    """x in the compute dtype, fp32 weights (as under autocast): the weights are cast as they are loaded."""
    _check(_inputs(130, 64, 256, device, scale=2.0, residual=residual, x_dtype=dtype), "none", dtype, device)


def test_fp32_input_computed_in_bf16(device):
    """Autocast's case: fp32 x and residual, bf16 GEMMs; the output is fp32 (promoted with the residual)."""
    _check(_inputs(67, 96, 384, device, residual=True), "tanh", torch.bfloat16, device)


def test_weights_in_the_compute_dtype(device):
    _check(_inputs(50, 64, 256, device, x_dtype=torch.bfloat16, param_dtype=torch.bfloat16), "none",
           torch.bfloat16, device)


def test_large_activations(device):
    """|pre| up to about 30: GELU's both tails (its derivative 0 and 1) and large products."""
    _check(_inputs(40, 32, 128, device, scale=30.0), "none", torch.float32, device)


@triton.jit
def _gelu_kernel(p_x, p_y, p_dy, N, TANH: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    y, dy = kmlp._gelu_and_grad(tl.load(p_x + o, mask=m, other=0.0), TANH, True)
    tl.store(p_y + o, y, mask=m)
    tl.store(p_dy + o, dy, mask=m)


def test_exact_gelu_elementwise(device):
    """The kernels' exact GELU and its derivative, element by element over [-14, 14] (both tails, where 1 + erf
    cancels), against float64: within 2e-6 absolute (the erfc fit: 4e-7 in fp32)."""
    x = torch.linspace(-14.0, 14.0, 20001, device=device)
    y, dy = torch.empty_like(x), torch.empty_like(x)
    _gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, dy, x.numel(), TANH=False, BLOCK=1024)
    x64 = x.double()
    cdf = 0.5 * torch.special.erfc(-x64 / math.sqrt(2.0))
    torch.testing.assert_close(y.double(), x64 * cdf, rtol=0, atol=2e-6)
    torch.testing.assert_close(dy.double(), cdf + x64 * torch.exp(-0.5 * x64 * x64) / math.sqrt(2 * math.pi),
                               rtol=0, atol=2e-6)


def test_programs_walk_many_token_blocks(device, monkeypatch):
    """Small blocks: the weight-gradient programs loop over several token blocks (the last one short)."""
    monkeypatch.setattr(kmlp, "DW_BLOCK_M", 16)
    monkeypatch.setattr(kmlp, "DX_BLOCK_M", 16)
    monkeypatch.setattr(kmlp, "FWD_BLOCK_M", 16)
    monkeypatch.setattr(kmlp, "DW_BLOCK_H", 32)
    _, rows_per_run = kmlp._dw_runs(301, 4, torch.device(device))
    assert rows_per_run >= 4 * 16 or device == "cuda"
    _check(_inputs(301, 32, 128, device), "none", torch.float32, device)


def test_strided_tensors_and_expanded_cotangent(device):
    """x and the residual as column slices of wider tensors, a 3-D batch, and y.sum()'s all-zero-stride dy."""
    wide = torch.randn(2, 23, 100, device=device)
    x, res = wide[..., 3:67], wide[..., 36:100]
    assert x.stride(-1) == 1 and x.stride(-2) == 100
    w = _inputs(1, 64, 256, device)[1:5]
    leaves = [t.clone().requires_grad_() for t in (x, *w, res)]
    y = mlp(*leaves[:5], "none", leaves[5])
    grads = torch.autograd.grad(y.sum(), leaves)
    l64 = [t.detach().double().requires_grad_() for t in (x, *w, res)]
    grads64 = torch.autograd.grad(_reference(*l64[:5], "none", l64[5]).sum(), l64)
    assert_matches("y", y, _reference(*[t.double() for t in (x, *w)], "none", res.double()))
    for name, g, g64 in zip(NAMES, grads, grads64, strict=True):
        assert_matches(f"d{name}", g, g64)


def _drop_path_scale(B, p, device):
    """Drop-path's factor for B >= 3 samples, dropped (0) and kept (1 / (1 - p)) ones mixed: 0 for every third
    sample from the second one on."""
    keep = torch.tensor([b % 3 != 1 for b in range(B)], dtype=torch.float32, device=device)
    return keep / (1.0 - p)


def _straddling_blocks(N, M, block_m):
    """Whether some token block of block_m rows holds rows of two samples (N tokens each)."""
    return any(m0 // N != (min(m0 + block_m, M) - 1) // N for m0 in range(0, M, block_m))


def _check_drop_path(B, N, C, HID, approximate, dtype, device, residual, x_dtype=torch.float32, p=0.2):
    """The scaled MLP against float64 for a batch of dropped and kept samples whose token blocks straddle two
    samples in every kernel; a dropped sample's output is its residual (or 0) and its x gradient 0, exactly."""
    for block_m in (kmlp.FWD_BLOCK_M, kmlp.DX_BLOCK_M, kmlp.DW_BLOCK_M):
        assert _straddling_blocks(N, B * N, block_m), f"no token block of {block_m} rows straddles two samples"
    scale = _drop_path_scale(B, p, device)
    tensors = _inputs((B, N), C, HID, device, scale=2.0, residual=residual, x_dtype=x_dtype)
    y, grads = _check(tensors, approximate, dtype, device, scale=scale)
    dropped = scale == 0
    assert dropped.any() and (~dropped).any()
    expected = tensors[5][dropped].to(y.dtype) if residual else torch.zeros_like(y[dropped])
    assert torch.equal(y[dropped], expected)
    assert torch.equal(grads["x"][dropped], torch.zeros_like(grads["x"][dropped]))


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_drop_path_scale_fp32_matches_float64(approximate, residual, device):
    _check_drop_path(5, 37, 64, 256, approximate, torch.float32, device, residual)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_drop_path_scale_low_precision_matches_reference_rule(dtype, residual, device):
    """x and the residual in the compute dtype, fp32 weights; 1 / (1 - p) = 1.25, exact in every dtype, so
    that PyTorch's own low-precision computation multiplies by the same factor."""
    _check_drop_path(4, 41, 64, 256, "none", dtype, device, residual, x_dtype=dtype)


def test_drop_path_scale_with_programs_walking_many_token_blocks(device, monkeypatch):
    """Blocks of 16 tokens and samples of 23: most blocks hold two samples, and the weight-gradient programs
    walk several of them; a factor 1 / (1 - p) that no dtype holds exactly."""
    for name in ("DW_BLOCK_M", "DX_BLOCK_M", "FWD_BLOCK_M"):
        monkeypatch.setattr(kmlp, name, 16)
    monkeypatch.setattr(kmlp, "DW_BLOCK_H", 32)
    _, rows_per_run = kmlp._dw_runs(6 * 23, 4, torch.device(device))
    assert rows_per_run >= 2 * 16 or device == "cuda"
    _check_drop_path(6, 23, 32, 128, "tanh", torch.float32, device, True, p=0.3)


def test_backward_is_deterministic(device):
    tensors = _inputs(300, 64, 256, device, x_dtype=torch.bfloat16)
    dy = torch.randn(300, 64, device=device)
    runs = [_grads(lambda *t: mlp(*t[:5], "none", t[5], dtype=torch.bfloat16), tensors, dy)[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_no_tokens(device):
    x, w1, b1, w2, b2, _ = _inputs(0, 32, 128, device)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    y = mlp(*leaves)
    assert y.shape == (0, 32)
    grads = torch.autograd.grad(y.sum(), leaves)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("drop_path", [False, True], ids=["plain", "drop-path"])
def test_torch_compile_traces_around_the_op(drop_path, device):
    if device == "cpu":
        pytest.skip("torch.compile of the interpreter's CPU path is not what this checks")
    tensors = _inputs((4, 50), 64, 256, device, x_dtype=torch.bfloat16)
    dy = torch.randn(4, 50, 64, device=device)
    scale = _drop_path_scale(4, 0.2, device) if drop_path else None
    f = torch.compile(lambda *t: mlp(*t[:5], "none", t[5], scale, dtype=torch.bfloat16), fullgraph=True)
    eager = _grads(lambda *t: mlp(*t[:5], "none", t[5], scale, dtype=torch.bfloat16), tensors, dy)
    compiled = _grads(f, tensors, dy)
    assert torch.equal(eager[0], compiled[0])
    assert all(torch.equal(a, b) for a, b in zip(eager[1], compiled[1], strict=True))


def _randn(*shape):
    return torch.randn(*shape, device=DEVICE)


def _bad(**override):
    args = dict(zip(NAMES[:5], _inputs(5, 32, 64, DEVICE, residual=False)[:5], strict=True))
    args.update(override)
    return args


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(lambda: _bad(w1=_randn(64, 33)), r"w1: expected shape \(hidden, 32\)", id="w1-shape"),
    pytest.param(lambda: _bad(b1=_randn(63)), r"b1: expected shape \(64,\)", id="b1-shape"),
    pytest.param(lambda: _bad(w2=_randn(64, 32)), r"w2: expected shape \(32, 64\)", id="w2-shape"),
    pytest.param(lambda: _bad(b2=_randn(31)), r"b2: expected shape \(32,\)", id="b2-shape"),
    pytest.param(lambda: _bad(x=_randn(5, 256), w1=_randn(64, 256), w2=_randn(256, 64), b2=_randn(256)),
                 "at most 128 channels", id="too-wide"),
    pytest.param(lambda: _bad(x=_randn(5, 32).double()), "got torch.float64", id="float64"),
    pytest.param(lambda: _bad(w1=_randn(32, 64).t()), "contiguous weight", id="strided-weight"),
    pytest.param(lambda: _bad(b1="bias"), "b1: expected a torch.Tensor", id="not-a-tensor"),
    pytest.param(lambda: {**_bad(), "residual": _randn(5, 31)}, r"residual: expected x's shape", id="residual"),
    pytest.param(lambda: {**_bad(), "approximate": "erf"}, "approximate: expected one of", id="approximate"),
    pytest.param(lambda: {**_bad(), "scale": [1.0] * 5}, "scale: expected a torch.Tensor", id="scale-list"),
    pytest.param(lambda: {**_bad(), "scale": _randn(1)}, r"scale: expected shape \(B,\) = \(5,\)",
                 id="scale-shape"),
    pytest.param(lambda: {**_bad(), "scale": _randn(5, 1)}, r"scale: expected shape \(B,\)", id="scale-2d"),
    pytest.param(lambda: {**_bad(), "scale": _randn(5).bfloat16()}, "scale: expected torch.float32",
                 id="scale-dtype"),
    pytest.param(lambda: {**_bad(), "scale": torch.ones(5, device="meta")}, "expected all tensors on one device",
                 id="scale-device"),
    pytest.param(lambda: {**_bad(), "scale": _randn(5).requires_grad_()}, "scale: expected a constant",
                 id="scale-requires-grad"),
    pytest.param(lambda: {**_bad(x=_randn(32)), "scale": _randn(1)}, r"scale: needs x of shape \(B, \.\.\., C\)",
                 id="scale-1d-x"),
])
def test_bad_input_raises(args, message):
    with pytest.raises(ValueError, match=message):
        mlp(**args())


def test_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = {name: t.cpu() for name, t in _bad().items()}
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        mlp(**args)


def test_block_dispatch(device):
    """The block takes the Triton MLP for C <= TRITON_MLP_MAX_CHANNELS with GELU and biases, and not for wider
    layers or fp32 on CUDA (where cuBLAS runs it)."""
    narrow = Mlp(TRITON_MLP_MAX_CHANNELS, 4 * TRITON_MLP_MAX_CHANNELS).to(device)
    wide = Mlp(2 * TRITON_MLP_MAX_CHANNELS, 8 * TRITON_MLP_MAX_CHANNELS).to(device)
    h = torch.randn(3, TRITON_MLP_MAX_CHANNELS, device=device)
    assert triton_mlp_supported(narrow, h) == (device == "cpu")
    assert not triton_mlp_supported(wide, torch.randn(3, 2 * TRITON_MLP_MAX_CHANNELS, device=device))
    with torch.autocast(device, dtype=torch.bfloat16):
        assert triton_mlp_supported(narrow, h)
