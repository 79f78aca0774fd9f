"""The Triton LayerNorm (kernels/layer_norm.py) against F.layer_norm, and the LayerNorm module that uses it.

Output, input gradient and the weight and bias gradients against a float64 ``F.layer_norm`` for row counts
that are not multiples of the tile, several channel counts (powers of two and not) and a 2-D input; programs
walking many row blocks; bf16/fp16 activations, CPU autocast and the fp32 output CUDA autocast asks for;
determinism, views, torch.compile, the custom-op registrations and the input checks. Every buffer the
kernels allocate is poisoned with NaN, so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlla_fast.kernels import dwconv
from mlla_fast.kernels import layer_norm as ln
from mlla_fast.kernels.layer_norm import layer_norm
from mlla_fast.layers import LayerNorm

from tolerance import assert_matches

# Rows not a multiple of the tile's (64 rows at C <= 64, 42 at C = 96, 8 at C = 512), C a power of two or not,
# a 2-D input, and the widest rows the kernels take.
SHAPES = [(3, 37, 64), (2, 5, 96), (1, 7, 512), (4, 3, 32), (53, 80), (2, 3, 4096)]
LOWP = [torch.bfloat16, torch.float16]
NAMES = ["y", "dx", "d weight", "d bias"]
EPS = 1e-5


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(ln, dwconv)


def make_inputs(shape: tuple[int, ...], device: str, dtype: torch.dtype = torch.float32,
                param_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """x (off-centre, so the mean matters), weight near one, bias near zero."""
    C = shape[-1]
    x = (torch.randn(shape, device=device) * 1.5 + 0.7).to(dtype)
    return [x, (1.0 + 0.3 * torch.randn(C, device=device)).to(param_dtype),
            (0.3 * torch.randn(C, device=device)).to(param_dtype)]


def leaves(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def run(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """[y, dx, d weight, d bias] of fn(x, weight, bias) for the output gradient grad."""
    y = fn(*inputs)
    return [y.detach(), *torch.autograd.grad(y, inputs, grad.to(y.dtype))]


def torch_ln(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def triton_ln(x, weight, bias):
    return layer_norm(x, weight, bias, EPS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_float64_reference(shape, device):
    inputs = make_inputs(shape, device)
    grad = torch.randn(shape, device=device)
    got = run(triton_ln, leaves(inputs), grad)
    ref = run(torch_ln, leaves(inputs, torch.float64), grad.double())
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert g.dtype == torch.float32, f"{name}: dtype {g.dtype}"
        assert_matches(name, g, r)


@pytest.mark.parametrize("shape", [(1031, 48), (4, 129, 200)], ids=lambda s: "x".join(map(str, s)))
def test_programs_walk_many_row_blocks(shape, device, monkeypatch):
    """Small tiles: each backward program loops over many row blocks, the last one short."""
    monkeypatch.setattr(ln, "TILE_ELEMENTS", 256)
    M = shape[0] if len(shape) == 2 else shape[0] * shape[1]
    block_m, _ = ln._tile(shape[-1])
    _, rows_per_prog = ln._bwd_runs(M, block_m, torch.device(device))
    assert rows_per_prog >= 8 * block_m or device == "cuda"
    inputs = make_inputs(shape, device)
    grad = torch.randn(shape, device=device)
    got = run(triton_ln, leaves(inputs), grad)
    ref = run(torch_ln, leaves(inputs, torch.float64), grad.double())
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert_matches(name, g, r)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_low_precision_activations_fp32_params(dtype, device):
    """bf16/fp16 x with fp32 parameters, no autocast: y and dx in x's dtype, parameter gradients in fp32, every
    result within twice the error of PyTorch's fp32 LayerNorm of the same x and gradient, its y and dx rounded to
    x's dtype, plus a floor (PyTorch's CUDA LayerNorm takes no bf16/fp16 x with fp32 parameters)."""
    shape = (3, 37, 96)
    inputs = make_inputs(shape, device, dtype=dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    got = run(triton_ln, leaves(inputs), grad)
    ref = run(torch_ln, leaves(inputs, torch.float64), grad.double())
    lowp = run(torch_ln, leaves([inputs[0].float(), *inputs[1:]]), grad.float())
    lowp = [t.to(dtype) for t in lowp[:2]] + lowp[2:]
    for i, (name, g, r, lp) in enumerate(zip(NAMES, got, ref, lowp, strict=True)):
        assert g.dtype == lp.dtype == (dtype if i < 2 else torch.float32), f"{name}: dtype {g.dtype}"
        assert_matches(name, g, r, lp, dtype=dtype)


def test_low_precision_parameters(device):
    """bf16 x with bf16 weight and bias: their gradients come back in bf16."""
    shape = (2, 45, 64)
    inputs = make_inputs(shape, device, dtype=torch.bfloat16, param_dtype=torch.bfloat16)
    grad = torch.randn(shape, device=device).bfloat16()
    got = run(triton_ln, leaves(inputs), grad)
    ref = run(torch_ln, leaves(inputs, torch.float64), grad.double())
    lowp = run(torch_ln, leaves(inputs), grad)
    for name, g, r, lp in zip(NAMES, got, ref, lowp, strict=True):
        assert g.dtype == torch.bfloat16, f"{name}: dtype {g.dtype}"
        assert_matches(name, g, r, lp, dtype=torch.bfloat16)


def test_autocast_bf16(device):
    """Under autocast (bf16 x, fp32 parameters): the output dtype F.layer_norm gives under the same autocast
    (fp32 on CUDA, where autocast runs LayerNorm in fp32; x's dtype on the CPU), every result within twice the
    error of F.layer_norm under the same autocast plus a floor, dx in bf16 and parameter gradients in fp32."""
    shape = (2, 57, 64)
    inputs = make_inputs(shape, device, dtype=torch.bfloat16)
    grad = torch.randn(shape, device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        got = run(triton_ln, leaves(inputs), grad)
        lowp = run(torch_ln, leaves(inputs), grad)
    ref = run(torch_ln, leaves(inputs, torch.float64), grad.double())
    for name, g, r, lp in zip(NAMES, got, ref, lowp, strict=True):
        assert g.dtype == lp.dtype, f"{name}: dtype {g.dtype}, F.layer_norm gives {lp.dtype}"
        assert_matches(name, g, r, lp, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_fp32_output_of_low_precision_input(dtype, device):
    """The op's fp32 output (what CUDA autocast asks for) from a bf16/fp16 x read directly, as CUDA autocast's
    F.layer_norm of x converted to fp32: y and the parameter gradients by the fp32 rule, dx in x's dtype within
    twice the error of that computation plus a floor."""
    shape = (3, 37, 64)
    inputs = make_inputs(shape, device, dtype=dtype)
    grad = torch.randn(shape, device=device)

    def fp32_out(x, weight, bias):
        return ln.layer_norm_fwd_op(x, weight, bias, EPS, True)

    def autocast_like(x, weight, bias):
        return torch_ln(x.float(), weight, bias)

    got = run(fp32_out, leaves(inputs), grad)
    ref = run(torch_ln, leaves(inputs, torch.float64), grad.double())
    lowp = run(autocast_like, leaves(inputs), grad)
    for name, g, r, lp in zip(NAMES, got, ref, lowp, strict=True):
        assert g.dtype == lp.dtype == (dtype if name == "dx" else torch.float32), f"{name}: dtype {g.dtype}"
        assert_matches(name, g, r, lp, dtype=dtype if name == "dx" else torch.float32)


def test_deterministic(device):
    shape = (5, 77, 96)
    inputs = make_inputs(shape, device, dtype=torch.bfloat16)
    grad = torch.randn(shape, device=device).bfloat16()
    first = run(triton_ln, leaves(inputs), grad)
    second = run(triton_ln, leaves(inputs), grad)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


def test_views_and_expanded_gradient(device):
    """x a channel slice of a wider tensor (row stride 2C), and y.sum()'s stride-0 output gradient: the
    results of the contiguous x and gradient, bitwise."""
    C = 64
    wide = torch.randn(3, 21, 2 * C, device=device)
    _, weight, bias = make_inputs((3, 21, C), device)
    view_leaves = leaves([wide[..., C:], weight, bias])
    y = triton_ln(*view_leaves)
    assert y.is_contiguous()
    got = [y.detach(), *torch.autograd.grad(y.sum(), view_leaves)]
    want = run(triton_ln, leaves([wide[..., C:].contiguous(), weight, bias]), torch.ones(3, 21, C, device=device))
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert torch.equal(a, b), name


def test_no_rows(device):
    x, weight, bias = leaves(make_inputs((0, 7, 32), device))
    y = triton_ln(x, weight, bias)
    assert y.shape == (0, 7, 32)
    dx, dw, db = torch.autograd.grad(y, [x, weight, bias], torch.empty_like(y))
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))


def test_compiles_without_graph_breaks(device):
    """Forward and backward inside torch.compile(fullgraph=True) equal eager exactly."""
    shape = (2, 19, 96)
    inputs = make_inputs(shape, device)
    grad = torch.randn(shape, device=device)

    def f(x, weight, bias):
        return triton_ln(x * 2, weight, bias) + 1

    eager = run(f, leaves(inputs), grad)
    compiled = run(torch.compile(f, backend="aot_eager", fullgraph=True), leaves(inputs), grad)
    for name, a, e in zip(NAMES, compiled, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fp32_out", [False, True])
def test_custom_op_registration(fp32_out, device):
    x, weight, bias = make_inputs((3, 11, 48), device, dtype=torch.bfloat16)
    torch.library.opcheck(ln.layer_norm_fwd_op, (x, weight, bias, EPS, fp32_out))
    dy = torch.randn(3, 11, 48, device=device, dtype=torch.float32 if fp32_out else torch.bfloat16)
    torch.library.opcheck(ln.layer_norm_bwd_op, (dy, x, weight, bias, EPS))


def _bad_cases(device: str) -> dict:
    x, weight, bias = make_inputs((2, 6, 32), device)
    return {
        "not a tensor": (lambda: layer_norm(x.tolist(), weight, bias), "x: expected a torch.Tensor, got list"),
        "scalar": (lambda: layer_norm(x[0, 0, 0], weight[:1], bias[:1]), r"shape \(\.\.\., C\)"),
        "no channels": (lambda: layer_norm(x[..., :0], weight[:0], bias[:0]), r"shape \(\.\.\., C\) with C >= 1"),
        "too wide": (lambda: layer_norm(torch.zeros(2, 8192, device=device), torch.ones(8192, device=device),
                                        torch.zeros(8192, device=device)), "at most 4096 channels, got 8192"),
        "float64": (lambda: layer_norm(x.double(), weight, bias), "float32, bfloat16 and float16"),
        "integer": (lambda: layer_norm(x.long(), weight, bias), "float32, bfloat16 and float16"),
        "meta device": (lambda: layer_norm(x.to("meta"), weight, bias), "need a CUDA tensor, got one on meta"),
        "channel stride": (lambda: layer_norm(x.transpose(1, 2), weight[:6], bias[:6]), "contiguous channels"),
        "weight shape": (lambda: layer_norm(x, weight[:16], bias), r"weight: expected shape \(32,\)"),
        "bias shape": (lambda: layer_norm(x, weight, bias.view(1, 32)), r"bias: expected shape \(32,\)"),
        "weight missing": (lambda: layer_norm(x, None, bias), "weight: expected a torch.Tensor, got NoneType"),
        "bias dtype": (lambda: layer_norm(x, weight, bias.double()), "bias: expected a float32, bfloat16"),
        "weight device": (lambda: layer_norm(x, weight.to("meta"), bias), "weight: expected a tensor on"),
        "negative eps": (lambda: layer_norm(x, weight, bias, -1.0), "eps: expected a finite number >= 0"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input_raises_value_error(case, device):
    call, message = _bad_cases(device)[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor, got one on cpu"):
        layer_norm(*make_inputs((4, 32), "cpu"))


# ----------------------------------------------------------------------------------------------
# The LayerNorm module (mlla_fast/layers.py)
# ----------------------------------------------------------------------------------------------


def test_module_is_a_drop_in_layer_norm(device):
    """Same state dict as nn.LayerNorm both ways (strict), the Triton op on the fused path, nn.LayerNorm's
    result with backend='torch'."""
    plain = torch.nn.LayerNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        plain.weight.normal_(1.0, 0.3)
        plain.bias.normal_(0.0, 0.3)
    fused = LayerNorm(96, eps=1e-6, backend="triton").to(device)
    fused.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 13, 96, device=device)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(fused(x), layer_norm(x, plain.weight, plain.bias, 1e-6))
    reference = LayerNorm(96, eps=1e-6, backend="torch").to(device)
    reference.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(reference(x), plain(x))


def test_module_from_layer_norm_shares_nothing_but_values(device):
    plain = torch.nn.LayerNorm(32, eps=1e-4).to(device)
    with torch.no_grad():
        plain.weight.normal_()
    fused = LayerNorm.from_layer_norm(plain, backend="triton")
    assert fused.eps == plain.eps and fused.normalized_shape == plain.normalized_shape
    assert torch.equal(fused.weight, plain.weight) and fused.weight is not plain.weight


def test_module_without_affine_parameters_falls_back(device):
    fused = LayerNorm(32, elementwise_affine=False, backend="triton").to(device)
    x = torch.randn(3, 32, device=device)
    assert torch.equal(fused(x), F.layer_norm(x, (32,)))


def test_fused_unet_runs_its_layer_norms_on_the_kernel(device, monkeypatch):
    """The fused MLLAUNet's bottleneck norm, norm_up and the three EUSMs' closing norms call the Triton op (five
    calls a forward, as PyTorch's LayerNorm kernels in the profile); state dicts load strictly both ways."""
    import mlla_fast
    from mlla_fast.reference import MLLAUNet as ReferenceUNet

    config = dict(img_size=32, num_classes=3, embed_dim=32, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1),
                  num_heads=(1, 2, 4, 8))
    ref = ReferenceUNet(**config)
    fast = mlla_fast.MLLAUNet(**config, backend="triton")
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    assert isinstance(fast.norm, LayerNorm) and isinstance(fast.norm_up, LayerNorm)
    assert list(fast.state_dict()) == list(ref.state_dict())
    calls = []
    fwd = ln.layer_norm_fwd_op
    monkeypatch.setattr(ln, "layer_norm_fwd_op", lambda x, *args: calls.append(x.shape[-1]) or fwd(x, *args))
    with torch.no_grad():
        fast.to(device).eval()(torch.randn(1, 3, 32, 32, device=device))
    assert sorted(calls) == [32, 32, 64, 128, 256], calls
