"""The fused depthwise-stencil kernels (kernels/dwconv.py) against the float64 reference ops.

Outputs and the gradients of every input and parameter, on fresh random inputs, grids that are not
tile multiples, strided views, low precision, determinism, torch.compile and the input checks.
Every buffer the kernels allocate is poisoned with NaN, so an element a kernel fails to write fails.
"""

from __future__ import annotations

import pytest
import torch

from mlla_fast.kernels import dwconv
from mlla_fast.kernels.dwconv import cpe_residual_norm, dwconv_silu
from mlla_fast.reference.ops import cpe_residual_norm_ref, dwconv_silu_ref

from tolerance import assert_matches

# (B, H, W, C): odd grids, a 1xN row, an Nx1 column, batch 1 and 3, C = 32 ... 128.
SHAPES = [(1, 1, 33, 32), (3, 7, 7, 64), (1, 13, 17, 96), (3, 14, 14, 128), (2, 9, 1, 32)]
OPS = ["cpe_residual_norm", "dwconv_silu"]
LOWP = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(dwconv)


def make_inputs(op: str, B: int, H: int, W: int, C: int, device: str, dtype=torch.float32,
                param_dtype=torch.float32) -> list[torch.Tensor]:
    """x (B, H*W, C) with a non-zero mean, then the op's parameters (weight, bias[, norm weight, norm bias])."""
    x = (torch.randn(B, H * W, C, device=device) + 0.5).to(dtype)
    params = [torch.randn(C, 1, 3, 3, device=device) * 0.3, torch.randn(C, device=device) * 0.5]
    if op == "cpe_residual_norm":
        params += [1.0 + 0.5 * torch.randn(C, device=device), 0.5 * torch.randn(C, device=device)]
    return [x, *(p.to(param_dtype) for p in params)]


def run(op: str, inputs: list[torch.Tensor], hw: tuple[int, int], grad_outs: list[torch.Tensor | None],
        reference: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of the kernel (or reference) op and the gradients of all inputs for the given output grads."""
    fn = {"cpe_residual_norm": (cpe_residual_norm, cpe_residual_norm_ref),
          "dwconv_silu": (dwconv_silu, dwconv_silu_ref)}[op][reference]
    outs = fn(*inputs, hw)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    used = [(o, g) for o, g in zip(outs, grad_outs, strict=True) if g is not None]
    grads = torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used], materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


def leaves(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def names(op: str) -> tuple[list[str], list[str]]:
    if op == "cpe_residual_norm":
        return ["r", "h"], ["dx", "d cpe_weight", "d cpe_bias", "d norm_weight", "d norm_bias"]
    return ["y"], ["dx", "d weight", "d bias"]


def check_fp32(op: str, inputs: list[torch.Tensor], hw: tuple[int, int], grad_outs: list[torch.Tensor | None]):
    """Kernel outputs and gradients against the float64 reference, fp32 rule."""
    outs, grads = run(op, inputs, hw, grad_outs)
    ref_outs, ref_grads = run(op, leaves(inputs, torch.float64), hw,
                              [None if g is None else g.double() for g in grad_outs], reference=True)
    out_names, grad_names = names(op)
    for name, out, ref in zip(out_names + grad_names, outs + grads, ref_outs + ref_grads, strict=True):
        assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}"
        assert_matches(f"{op} {name}", out, ref)
    return outs, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}x{}_C{}".format(*s))
@pytest.mark.parametrize("op", OPS)
def test_fp32_matches_float64_reference(op, shape, device):
    B, H, W, C = shape
    inputs = leaves(make_inputs(op, B, H, W, C, device))
    grad_outs = [torch.randn(B, H * W, C, device=device) for _ in names(op)[0]]
    check_fp32(op, inputs, (H, W), grad_outs)


def test_cpe_residual_norm_1024_channels_single_pass(device):
    """The LayerNorm op holds all C channels of a token in one program, up to C = 1024 and beyond."""
    inputs = leaves(make_inputs("cpe_residual_norm", 2, 3, 5, 1024, device))
    check_fp32("cpe_residual_norm", inputs, (3, 5), [torch.randn(2, 15, 1024, device=device) for _ in range(2)])


@pytest.mark.parametrize("used", ["r", "h"])
def test_cpe_residual_norm_one_output_used(used, device):
    """Only r or only h reaches the loss: the other output's gradient is absent, not zero-filled."""
    B, H, W, C = 2, 6, 5, 64
    inputs = leaves(make_inputs("cpe_residual_norm", B, H, W, C, device))
    grad = torch.randn(B, H * W, C, device=device)
    check_fp32("cpe_residual_norm", inputs, (H, W), [grad, None] if used == "r" else [None, grad])


@pytest.mark.parametrize("op", OPS)
def test_strided_views(op, device):
    """x a column slice of a wider tensor (token stride 3C) taken from every other sample; strided output grads."""
    B, H, W, C = 2, 7, 9, 64
    wide = torch.randn(2 * B, H * W, 3 * C, device=device) + 0.5
    x_view = wide[::2, :, C:2 * C].requires_grad_()
    _, *params = leaves(make_inputs(op, B, H, W, C, device))
    inputs = [x_view, *params]
    assert x_view.stride() == (2 * H * W * 3 * C, 3 * C, 1)
    grad_outs = [torch.randn(B, H * W, 2 * C, device=device)[..., :C] for _ in names(op)[0]]
    check_fp32(op, inputs, (H, W), grad_outs)


def test_huge_token_strides_are_copied():
    """For the row-walking kernels (int32 column offsets), a view whose offsets within a grid row pass int32
    is made contiguous; other channel-contiguous views are read in place."""
    huge = torch.empty_strided((2, 16, 8), (16 * 2**28, 2**28, 1), device="meta")
    assert dwconv._tokens_major(huge, 8).stride() == (128, 8, 1)
    assert dwconv._tokens_major(huge, 4) is huge  # 4 columns of 2^28: offsets within a row fit in int32
    wide = torch.empty_strided((2, 16, 8), (16 * 24, 24, 1), device="meta")
    assert dwconv._tokens_major(wide, 16) is wide
    channels_strided = torch.empty_strided((2, 16, 8), (128, 1, 16), device="meta")
    assert dwconv._tokens_major(channels_strided, 16).stride() == (128, 8, 1)


@pytest.mark.parametrize("op", OPS)
def test_many_tiles_per_program(op, device, monkeypatch):
    """Few programs: each program of the forward stencils and the transposed one walks many row tiles, across
    strips and samples, its prefetch reaching into the next strip and past its run's end."""
    monkeypatch.setattr(dwconv, "TILE_ELEMENTS", 512)
    monkeypatch.setattr(dwconv, "PARTIAL_PROGRAMS", 3)
    B, H, W, C = 2, 11, 10, 64
    inputs = leaves(make_inputs(op, B, H, W, C, device))
    check_fp32(op, inputs, (H, W), [torch.randn(B, H * W, C, device=device) for _ in names(op)[0]])


@pytest.mark.parametrize("shape", [(2, 9, 13, 96), (3, 5, 16, 64), (2, 7, 3, 512)],
                         ids=lambda s: "B{}_{}x{}_C{}".format(*s))
@pytest.mark.parametrize("used", ["both", "r", "h"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no_prefetch"])
def test_cpe_residual_norm_backward_walks_rows(used, shape, prefetch, device, monkeypatch):
    """Few backward programs, so each walks many grid rows, carrying x's neighbourhood from row to row and
    refilling it where its run starts mid-strip and where it enters the next strip (column block or
    sample); channels short of a power of two or not, grids a multiple of the tile width or not; with and
    without the prefetch of each next tile (across strips, and at a run's end)."""
    monkeypatch.setattr(dwconv, "PARTIAL_PROGRAMS", 5)
    monkeypatch.setattr(dwconv, "CPE_BWD_PREFETCH", prefetch)
    B, H, W, C = shape
    inputs = leaves(make_inputs("cpe_residual_norm", B, H, W, C, device))
    grads = [torch.randn(B, H * W, C, device=device) for _ in range(2)]
    check_fp32("cpe_residual_norm", inputs, (H, W),
               [None if used == "h" else grads[0], None if used == "r" else grads[1]])


# (B, H, W, C) for 7 partial programs in all: a run starts mid-strip and crosses into the next strip (the
# next column block or sample) in each; 1 to 3 channel blocks of 32, 64 or 128 channels; grids a multiple
# of the tile width (16 and 40 columns) or not (13 and 3).
PARAM_GRAD_WALKS = [(3, 5, 13, 96), (2, 6, 16, 64), (2, 7, 3, 256), (1, 4, 40, 384)]


def _depthwise_param_grads_ref(g: torch.Tensor, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """float64 dw[c, 3 * di + dj] = sum_p g[p, c] x[p + (di - 1, dj - 1), c] (zero padding), db[c] = sum_p g[p, c]."""
    (H, W), (B, _, C) = hw, x.shape
    xp = torch.nn.functional.pad(x.double().view(B, H, W, C), (0, 0, 1, 1, 1, 1))
    g64 = g.double().view(B, H, W, C)
    dw = torch.stack([(g64 * xp[:, di:di + H, dj:dj + W]).sum((0, 1, 2)) for di in range(3) for dj in range(3)], 1)
    return dw, g64.sum((0, 1, 2))


@pytest.mark.parametrize("shape", PARAM_GRAD_WALKS, ids=lambda s: "B{}_{}x{}_C{}".format(*s))
def test_param_grads_walk_rows(shape, device, monkeypatch):
    """Few parameter-gradient programs per channel block, so each walks many grid rows, carrying x's
    neighbourhood from row to row and refilling it where its run starts mid-strip and where it enters the
    next strip: dwconv_silu's backward (g = dy * SiLU'(pre) recomputed in the kernel) and the plain
    depthwise parameter gradients (g given), against float64."""
    monkeypatch.setattr(dwconv, "PARTIAL_PROGRAMS", 7)
    B, H, W, C = shape
    inputs = leaves(make_inputs("dwconv_silu", B, H, W, C, device))
    check_fp32("dwconv_silu", inputs, (H, W), [torch.randn(B, H * W, C, device=device)])
    x, g = torch.randn(B, H * W, C, device=device) + 0.5, torch.randn(B, H * W, C, device=device)
    for name, out, ref in zip(("dw", "db"), dwconv.depthwise_param_grads(g, x, (H, W)),
                              _depthwise_param_grads_ref(g, x, (H, W)), strict=True):
        assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}"
        assert_matches(f"depthwise_param_grads {name}", out, ref)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_low_precision_activations_fp32_params(op, dtype, device):
    """bf16/fp16 activations with fp32 parameters (as under autocast): outputs in the activation dtype,
    parameter gradients in fp32; errors within twice PyTorch's own low-precision error plus a floor."""
    B, H, W, C = 2, 10, 13, 96
    inputs = make_inputs(op, B, H, W, C, device, dtype=dtype)
    grad_outs = [torch.randn(B, H * W, C, device=device).to(dtype) for _ in names(op)[0]]
    outs, grads = run(op, leaves(inputs), (H, W), grad_outs)
    ref_outs, ref_grads = run(op, leaves(inputs, torch.float64), (H, W), [g.double() for g in grad_outs],
                              reference=True)
    lowp_outs, lowp_grads = run(op, leaves(inputs, dtype), (H, W), grad_outs, reference=True)
    out_names, grad_names = names(op)
    expected_dtypes = [dtype] * (len(out_names) + 1) + [torch.float32] * (len(grad_names) - 1)
    for name, out, ref, lowp, expected in zip(out_names + grad_names, outs + grads, ref_outs + ref_grads,
                                              lowp_outs + lowp_grads, expected_dtypes, strict=True):
        assert out.dtype == expected, f"{name}: dtype {out.dtype}, expected {expected}"
        assert_matches(f"{op} {name}", out, ref, lowp, dtype=dtype)


@pytest.mark.parametrize("op", OPS)
def test_deterministic(op, device):
    B, H, W, C = 2, 9, 12, 64
    inputs = make_inputs(op, B, H, W, C, device)
    grad_outs = [torch.randn(B, H * W, C, device=device) for _ in names(op)[0]]
    first = run(op, leaves(inputs), (H, W), grad_outs)
    second = run(op, leaves(inputs), (H, W), grad_outs)
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert torch.equal(a, b)


def test_compiles_without_graph_breaks(device):
    """Both ops inside one torch.compile(fullgraph=True) region, forward and backward, match eager."""
    B, H, W, C = 2, 5, 6, 64
    x, w, b, nw, nb = make_inputs("cpe_residual_norm", B, H, W, C, device)

    def block_part(x, w, b, nw, nb):
        r, h = cpe_residual_norm(x, w, b, nw, nb, (H, W))
        return r + dwconv_silu(h, w, b, (H, W))

    eager_in, compiled_in = leaves([x, w, b, nw, nb]), leaves([x, w, b, nw, nb])
    grad = torch.randn(B, H * W, C, device=device)
    eager = block_part(*eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in, grad)
    compiled = torch.compile(block_part, backend="aot_eager", fullgraph=True)(*compiled_in)
    compiled_grads = torch.autograd.grad(compiled, compiled_in, grad)
    for a, e in zip((compiled, *compiled_grads), (eager, *eager_grads), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["cpe_residual_norm_fwd", "dwconv_silu_fwd"])
def test_custom_op_registration(op, device):
    """Schema, fake (meta) implementation and autograd registration of the custom ops."""
    H, W = 3, 4
    inputs = make_inputs(op.removesuffix("_fwd"), 1, H, W, 32, device)
    args = [inputs[0].requires_grad_(), *inputs[1:], H, W] + ([1e-5] if op.startswith("cpe") else [])
    torch.library.opcheck(getattr(torch.ops.mlla_fast, op).default, tuple(args),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _bad_cases(device: str) -> dict:
    """Name -> (call taking the op as f(x, weight, bias, hw), expected message)."""
    C = 64
    x = torch.randn(2, 12, C, device=device)
    w, b = torch.randn(C, 1, 3, 3, device=device), torch.randn(C, device=device)
    return {
        "grid": (lambda f: f(x, w, b, (3, 5)), "does not match the grid 3x5"),
        "grid values": (lambda f: f(x, w, b, (0, 12)), "pair of positive integers"),
        "grid type": (lambda f: f(x, w, b, 12), "pair of positive integers"),
        "2-D x": (lambda f: f(x[0], w, b, (3, 4)), "3-D"),
        "channels": (lambda f: f(x[..., :48], w[:48], b[:48], (3, 4)), "multiple of 32, got 48"),
        "weight shape": (lambda f: f(x, w.view(C, 9), b, (3, 4)), r"\(64, 1, 3, 3\)"),
        "weight channels": (lambda f: f(x, w[:32], b, (3, 4)), r"\(64, 1, 3, 3\)"),
        "bias shape": (lambda f: f(x, w, b[:32], (3, 4)), r"bias: expected shape \(64,\)"),
        "integer x": (lambda f: f(x.long(), w, b, (3, 4)), "floating-point"),
        "integer weight": (lambda f: f(x, w.int(), b, (3, 4)), "floating-point"),
        "float64 x": (lambda f: f(x.double(), w, b, (3, 4)), "float32, bfloat16 and float16"),
        "empty batch": (lambda f: f(x[:0], w, b, (3, 4)), "at least one sample"),
        "mixed devices": (lambda f: f(x, w.to("meta"), b, (3, 4)), "on meta"),
    }


BAD_CASES = list(_bad_cases("cpu"))


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("op", OPS)
def test_bad_input_raises_value_error(op, case, device):
    call, message = _bad_cases(device)[case]

    def f(x, w, b, hw):
        if op == "dwconv_silu":
            return dwconv_silu(x, w, b, hw)
        C = x.shape[-1] if x.dim() == 3 else b.shape[0]
        return cpe_residual_norm(x, w, b, torch.ones(C, device=device), torch.zeros(C, device=device), hw)

    with pytest.raises(ValueError, match=message):
        call(f)


def test_cpe_residual_norm_rejects_bad_norm_parameters(device):
    x = torch.randn(1, 6, 64, device=device)
    w, b = torch.randn(64, 1, 3, 3, device=device), torch.randn(64, device=device)
    with pytest.raises(ValueError, match=r"norm_weight: expected shape \(64,\)"):
        cpe_residual_norm(x, w, b, torch.ones(32, device=device), torch.zeros(64, device=device), (2, 3))
    with pytest.raises(ValueError, match="at most 4096 channels"):
        x = torch.randn(1, 1, 4128, device=device)
        p = torch.ones(4128, device=device)
        cpe_residual_norm(x, torch.ones(4128, 1, 3, 3, device=device), p, p, p, (1, 1))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="need a CUDA tensor, got one on cpu"):
        dwconv_silu(x, torch.randn(32, 1, 3, 3), torch.randn(32), (2, 2))


def test_backward_launchers_check_their_tensors(device):
    x = torch.randn(1, 6, 32, device=device)
    w, b = torch.randn(32, 1, 3, 3, device=device), torch.randn(32, device=device)
    with pytest.raises(ValueError, match=r"dy: expected a floating-point tensor of shape \(1, 6, 32\)"):
        dwconv.dwconv_silu_bwd(x[:, :3], x, w, b, (2, 3))
    with pytest.raises(ValueError, match=r"dh: expected a floating-point tensor of shape \(1, 6, 32\)"):
        dwconv.cpe_residual_norm_bwd(None, x.long(), x, w, b, b, b, (2, 3))


def test_reduce_partials_sums_columns_into_separate_outputs(device, poison_outputs):
    """Rows not a multiple of the row block, columns not a multiple of the column block, outputs of
    several shapes and dtypes: each equals torch.sum over its columns, and no two share memory."""
    poison_outputs(dwconv)
    part = torch.randn(70, 9 * 5 + 5 + 3, device=device)
    dw, db, extra = dwconv.reduce_partials(part, [((5, 1, 3, 3), torch.float32), ((5,), torch.float32),
                                                  ((3,), torch.bfloat16)])
    total = part.double().sum(0)
    torch.testing.assert_close(dw, total[:45].view(5, 1, 3, 3).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(db, total[45:50].float(), rtol=1e-6, atol=1e-5)
    assert extra.dtype == torch.bfloat16
    torch.testing.assert_close(extra, total[50:].to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    assert len({t.untyped_storage().data_ptr() for t in (dw, db, extra)}) == 3


def test_reduce_partials_checks_the_column_split(device):
    with pytest.raises(ValueError, match=r"2 outputs of sizes \[4, 4\] for partials of shape \(3, 9\)"):
        dwconv.reduce_partials(torch.zeros(3, 9, device=device), [((4,), torch.float32), ((4,), torch.float32)])
