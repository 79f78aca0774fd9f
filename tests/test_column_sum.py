"""The Triton column sum (kernels/column_sum.py) and the Linear with its bias gradient (mlla_fast/linear.py).

Column sums against float64 sums for odd shapes, strided rows, every input dtype and several output
dtypes, programs walking several row blocks, torch.compile and the input checks; every buffer the
kernels allocate is poisoned with NaN, so an element a kernel fails to write fails. The Linear's
output and gradients against ``F.linear`` under autograd, in float64, float32 and CPU/GPU autocast.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlla_fast.kernels import column_sum as colsum
from mlla_fast.kernels import dwconv
from mlla_fast.kernels.column_sum import column_sum
from mlla_fast.linear import linear

SHAPES = [(1, 1), (7, 33), (33, 7), (1000, 1), (1031, 33), (1029, 300), (5, 513)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerance of an fp32-accumulated sum of n terms against the exact one, relative to the sum of |x|.
FP32_SUM_RTOL = 1e-6


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(colsum, dwconv)


def _check(out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> None:
    """out (N,) in dtype equals the float64 column sums of x to fp32 accumulation, then rounding to dtype."""
    exact = x.double().sum(0)
    assert out.dtype == dtype and out.shape == exact.shape
    bound = FP32_SUM_RTOL * x.double().abs().sum(0) + 1e-30
    if dtype != torch.float32:
        bound = bound + exact.abs() * torch.finfo(dtype).eps
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), f"max error {err.max():.3e}, bound there {bound[err.argmax()]:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}x{}".format(*s))
def test_matches_float64_sum(shape, dtype, device):
    x = (torch.randn(*shape, device=device) + 0.3).to(dtype)
    _check(column_sum(x), x, torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_output_dtype(out_dtype, device):
    x = torch.randn(517, 40, device=device).bfloat16()
    _check(column_sum(x, out_dtype), x, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", ["column slice", "row step", "row slice"])
def test_strided_rows(view, dtype, device):
    """Row strides other than the column count: a column slice of a wider tensor, every other row, a row range."""
    wide = (torch.randn(1037, 97, device=device) - 0.2).to(dtype)
    x = {"column slice": wide[:, 13:46], "row step": wide[::2, :33], "row slice": wide[100:901, 64:]}[view]
    assert x.stride(1) == 1 and x.stride(0) != x.shape[1]
    _check(column_sum(x), x, torch.float32)


@pytest.mark.parametrize("shape", [(1000, 7), (3001, 33), (517, 130)], ids=lambda s: "{}x{}".format(*s))
def test_programs_walk_many_row_blocks(shape, device, monkeypatch):
    """Small tiles and few programs: each program loops over many row blocks, the last one short; and
    several column blocks."""
    monkeypatch.setattr(colsum, "COLSUM_TILE_ELEMENTS", 128)
    monkeypatch.setattr(colsum, "MAX_BLOCK_N", 32)
    block_m, _, _, rows_per_prog = colsum._launch_geometry(*shape, torch.device(device))
    assert rows_per_prog >= 4 * block_m or device == "cuda"
    x = torch.randn(*shape, device=device)
    _check(column_sum(x), x, torch.float32)


def test_no_rows_gives_zeros(device):
    out = column_sum(torch.empty(0, 9, device=device))
    assert torch.equal(out, torch.zeros(9, device=device))
    assert column_sum(torch.empty(5, 0, device=device)).shape == (0,)


def test_deterministic(device):
    x = torch.randn(2049, 200, device=device).bfloat16()
    assert torch.equal(column_sum(x), column_sum(x))


def test_compiles_without_graph_breaks(device):
    x = torch.randn(300, 48, device=device)

    def f(x):
        return column_sum(x * 2, torch.bfloat16).float() + 1

    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x), rtol=0, atol=0)


def test_custom_op_registration(device):
    x = torch.randn(70, 12, device=device)
    torch.library.opcheck(torch.ops.mlla_fast.column_sum.default, (x, torch.float32),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _bad_cases(device: str) -> dict:
    x = torch.randn(6, 8, device=device)
    return {
        "1-D": (lambda: column_sum(x[0]), "2-D"),
        "3-D": (lambda: column_sum(x.view(2, 3, 8)), "2-D"),
        "column stride": (lambda: column_sum(x.t()), "column stride 1"),
        "float64": (lambda: column_sum(x.double()), "float32, bfloat16 and float16"),
        "integer": (lambda: column_sum(x.long()), "float32, bfloat16 and float16"),
        "meta device": (lambda: column_sum(x.to("meta")), "need a CUDA tensor, got one on meta"),
        "not a tensor": (lambda: column_sum(x.tolist()), "expected a torch.Tensor, got list"),
        "integer output": (lambda: column_sum(x, torch.int32), "floating-point torch.dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_raises_value_error(case, device):
    call, message = _bad_cases(device)[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor, got one on cpu"):
        column_sum(torch.randn(4, 32))


# ----------------------------------------------------------------------------------------------
# The Linear with the column-sum bias gradient
# ----------------------------------------------------------------------------------------------


def _linear_grads(fn, x, w, b, dy):
    y = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    return [y, *torch.autograd.grad(y, inputs, dy.to(y.dtype))]


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_linear_matches_f_linear(dtype, has_bias, device):
    """Output, dx, dW and db of (B, N, K) tokens equal F.linear's under autograd (the column sum only
    reorders the fp32 bias sum)."""
    x = torch.randn(3, 117, 40, device=device, dtype=dtype)
    w = torch.randn(72, 40, device=device, dtype=dtype) * 0.2
    b = torch.randn(72, device=device, dtype=dtype) if has_bias else None
    dy = torch.randn(3, 117, 72, device=device, dtype=dtype)
    ours = _linear_grads(linear, *_leaves(x, w, b), dy)
    expected = _linear_grads(F.linear, *_leaves(x, w, b), dy)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, e in zip(["y", "dx", "dW", "db"], ours, expected, strict=False):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=name)


def test_linear_with_an_expanded_output_gradient(device):
    """y.sum().backward() hands the backward a gradient of stride 0."""
    x, w, b = _leaves(torch.randn(2, 9, 16, device=device), torch.randn(8, 16, device=device),
                      torch.randn(8, device=device))
    linear(x, w, b).sum().backward()
    torch.testing.assert_close(b.grad, torch.full((8,), 18.0, device=device))
    torch.testing.assert_close(w.grad, x.detach().sum((0, 1)).expand(8, 16).contiguous())


def test_linear_under_autocast_is_as_accurate_as_pytorch(device):
    """bf16 autocast: the dtypes of F.linear under autocast (y bf16, gradients in the fp32 leaves' dtype),
    and errors against the float64 truth no larger than 1.25x those of PyTorch's autocast computation."""
    x = torch.randn(4, 1000, 64, device=device)
    w = torch.randn(96, 64, device=device) * 0.1
    b = torch.randn(96, device=device)
    dy = torch.randn(4, 1000, 96, device=device)
    truth = _linear_grads(F.linear, *_leaves(x.double(), w.double(), b.double()), dy.double())
    with torch.autocast(device, dtype=torch.bfloat16):
        torch_out = _linear_grads(F.linear, *_leaves(x, w, b), dy)
        ours = _linear_grads(linear, *_leaves(x, w, b), dy)
    for name, a, e, t in zip(["y", "dx", "dW", "db"], ours, torch_out, truth, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        err_ours = (a.double() - t).abs().max() / t.abs().max()
        err_torch = (e.double() - t).abs().max() / t.abs().max()
        assert err_ours <= 1.25 * err_torch + 1e-6, f"{name}: {err_ours:.2e} vs PyTorch {err_torch:.2e}"


def test_linear_only_computes_needed_gradients(device):
    x = torch.randn(5, 8, device=device)
    w, b = _leaves(torch.randn(4, 8, device=device), torch.randn(4, device=device))
    (dw,) = torch.autograd.grad(linear(x, w, b).square().sum(), [w])
    x2, w2, b2 = _leaves(x, w, b)
    (expected,) = torch.autograd.grad(F.linear(x2, w2, b2).square().sum(), [w2])
    torch.testing.assert_close(dw, expected)


def test_linear_compiles_without_graph_breaks(device):
    """The Linear's forward and backward (with the column-sum op) inside torch.compile(fullgraph=True)."""
    x, w, b = torch.randn(2, 50, 32, device=device), torch.randn(48, 32, device=device), torch.randn(48, device=device)
    dy = torch.randn(2, 50, 48, device=device)
    eager = _linear_grads(linear, *_leaves(x, w, b), dy)
    compiled = _linear_grads(torch.compile(linear, backend="aot_eager", fullgraph=True), *_leaves(x, w, b), dy)
    for a, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
