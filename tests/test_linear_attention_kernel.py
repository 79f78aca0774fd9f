"""The fused linear attention (kernels/linear_attention.py) against the float64 reference op.

Outputs and the gradients of qk, v, g, lepe weight and bias on fresh random inputs, awkward grids,
fp32 (1e-5 relative) and bf16/fp16 (the rule of tolerance.py); every kernel output is allocated
NaN-poisoned so an unwritten element fails. Also: the RoPE cos/sin at large grids, strided views,
64-bit offsets, determinism, torch.compile/opcheck, the bad-input errors, and that the kernels compile
for sm_90 (the path the interpreter does not exercise).
"""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from mlla_fast.kernels import dwconv
from mlla_fast.kernels import linear_attention as la
from mlla_fast.reference.ops import linear_attention_ref, rope_frequencies, rope_table

from tolerance import assert_matches

GRAD_NAMES = ("qk", "v", "g", "lepe_weight", "lepe_bias")

# Kernel launch configurations under test: the shipped defaults; large blocks (few interpreter steps; on a
# GPU 128 tokens, since 256-token fp32 backward blocks need more shared memory than a Hopper SM has);
# the smallest blocks with many token splits and strided pair loads (exercises the partial sums).
DEFAULT = la.LinearAttentionConfig()
_LARGE = 128 if torch.cuda.is_available() else 256
LARGE_BLOCKS = dataclasses.replace(DEFAULT, fwd_reduce_block_n=_LARGE, fwd_out_block_n=_LARGE, bwd_q_block_n=_LARGE,
                                   bwd_kv_block_n=_LARGE)
MANY_SPLITS = dataclasses.replace(DEFAULT, fwd_reduce_block_n=16, fwd_out_block_n=16, bwd_q_block_n=16,
                                  bwd_kv_block_n=16, programs_per_sm=64, pair_loads="strided", trig="compute")
COMPUTED_TRIG = dataclasses.replace(DEFAULT, trig="compute")
assert DEFAULT.trig == "reduced"
TRIG_TABLE = dataclasses.replace(DEFAULT, trig="table")
# the default's bf16/fp16 dot operands (lowp_dot_precision="lowp-operands") against fp32 tiles at tf32 precision
assert DEFAULT.lowp_dot_precision == "lowp-operands"
TF32_LARGE = dataclasses.replace(LARGE_BLOCKS, lowp_dot_precision="tf32")
TF32_MANY_SPLITS = dataclasses.replace(MANY_SPLITS, lowp_dot_precision="tf32")


@pytest.fixture(autouse=True)
def _poisoned_outputs(poison_outputs):
    # dwconv: the LePE parameter gradients come from its parameter-gradient kernel
    poison_outputs(la, dwconv)


@pytest.fixture
def config(request, monkeypatch):
    monkeypatch.setattr(la, "CONFIG", request.param)
    return request.param


def make_inputs(B, H, W, C, device, dtype=torch.float32, param_dtype=torch.float32, scale=1.0, gate=True):
    """Leaf tensors qk (B, N, 2C), v, g (B, N, C), lepe weight (C, 1, 3, 3), bias (C,); qk scaled by `scale`."""
    N = H * W
    t = {
        "qk": torch.randn(B, N, 2 * C, device=device) * scale,
        "v": torch.randn(B, N, C, device=device),
        "g": torch.randn(B, N, C, device=device) if gate else None,
        "lepe_weight": torch.randn(C, 1, 3, 3, device=device) / 3,
        "lepe_bias": torch.randn(C, device=device),
    }
    for name in ("qk", "v", "g"):
        if t[name] is not None:
            t[name] = t[name].to(dtype)
    for name in ("lepe_weight", "lepe_bias"):
        t[name] = t[name].to(param_dtype)
    return {k: (x.requires_grad_() if x is not None else None) for k, x in t.items()}


def run(fn, inputs, hw, num_heads, dy, **kwargs):
    """fn's output and the gradients of all inputs for the cotangent dy (inputs are detached copies)."""
    leaves = {k: (x.detach().clone().requires_grad_() if x is not None else None) for k, x in inputs.items()}
    y = fn(*(leaves[k] for k in GRAD_NAMES), hw, num_heads, **kwargs)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: x.grad for k, x in leaves.items() if x is not None}


def reference64(inputs, hw, num_heads, dy, **kwargs):
    """The reference op in float64 (float64 copies of the inputs and of the RoPE table)."""
    inputs64 = {k: (x.detach().double() if x is not None else None) for k, x in inputs.items()}
    table = rope_table(*hw, inputs["v"].shape[-1], device=inputs["v"].device, dtype=torch.float64)
    return run(linear_attention_ref, inputs64, hw, num_heads, dy.double(), rotations=table, **kwargs)


def check(inputs, hw, num_heads, seed_dy=1, **kwargs):
    """Kernel vs float64 reference (and, in low precision, PyTorch's own low-precision reference); kwargs
    (gate_silu) go to both."""
    dtype = inputs["v"].dtype
    dy = torch.randn(inputs["v"].shape, generator=torch.Generator().manual_seed(seed_dy)).to(inputs["v"].device)
    y, grads = run(la.linear_attention, inputs, hw, num_heads, dy, **kwargs)
    y64, grads64 = reference64(inputs, hw, num_heads, dy, **kwargs)
    y_lowp, grads_lowp = None, {}
    if dtype != torch.float32:
        # PyTorch's own low-precision computation: parameters in the activation dtype (conv2d needs one dtype)
        lowp = {k: (x.detach().to(dtype) if x is not None else None) for k, x in inputs.items()}
        y_lowp, grads_lowp = run(linear_attention_ref, lowp, hw, num_heads, dy, **kwargs)
    assert y.dtype == dtype
    assert_matches("y", y, y64, y_lowp, dtype)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"d{name}: dtype {grad.dtype} != {inputs[name].dtype}"
        assert_matches(f"d{name}", grad, grads64[name], grads_lowp.get(name), dtype)


# (B, H, W, C, qk scale, gate, config): 1xN, non-square, odd grids; C = 32, 64, 96 (a head mixing row and
# column RoPE), 128; B = 1 and 3; |qk| ~ 30 so phi's exp branch and the normaliser are exercised.
FP32_CASES = [
    pytest.param(1, 1, 33, 64, 1.0, False, DEFAULT, id="1x33-C64-nogate"),
    pytest.param(3, 7, 7, 32, 1.0, True, DEFAULT, id="B3-7x7-C32"),
    pytest.param(2, 13, 17, 96, 1.0, True, LARGE_BLOCKS, id="B2-13x17-C96"),
    pytest.param(2, 9, 7, 64, 3.0, True, TRIG_TABLE, id="B2-9x7-C64-trig-table"),
    pytest.param(2, 9, 7, 64, 3.0, True, COMPUTED_TRIG, id="B2-9x7-C64-trig-compute"),
    pytest.param(1, 14, 14, 128, 30.0, True, LARGE_BLOCKS, id="14x14-C128-scale30"),
    pytest.param(1, 32, 32, 64, 30.0, True, LARGE_BLOCKS, id="32x32-C64-scale30"),
    pytest.param(2, 5, 9, 64, 3.0, True, MANY_SPLITS, id="B2-5x9-C64-many-splits"),
]


@pytest.mark.parametrize(("B", "H", "W", "C", "scale", "gate", "config"), FP32_CASES, indirect=["config"])
def test_fp32_matches_float64_reference(B, H, W, C, scale, gate, config, device):
    inputs = make_inputs(B, H, W, C, device, scale=scale, gate=gate)
    check(inputs, (H, W), C // 32)


@pytest.mark.parametrize("config", [DEFAULT, MANY_SPLITS, TF32_MANY_SPLITS], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_gate_matches_reference(dtype, config, device):
    """gate_silu=True: g is the pre-activation and SiLU(g) gates; g is scaled so that SiLU's negative side
    (and its derivative's sign change) is exercised."""
    B, H, W, C = 2, 6, 11, 64
    inputs = make_inputs(B, H, W, C, device, dtype=dtype, scale=3.0)
    inputs["g"] = (torch.randn(B, H * W, C, device=device) * 4).to(dtype).requires_grad_()
    check(inputs, (H, W), C // 32, gate_silu=True)


@pytest.mark.parametrize("config", [LARGE_BLOCKS, TF32_LARGE], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["fp32", "same"])
def test_low_precision_matches_reference_rule(dtype, param_dtype, config, device):
    p_dtype = torch.float32 if param_dtype == "fp32" else dtype
    inputs = make_inputs(2, 9, 11, 96, device, dtype=dtype, param_dtype=p_dtype, scale=3.0)
    check(inputs, (9, 11), 3)


# (B, H, W, C, qk scale, gate, config) for bf16/fp16 dot operands: the many-splits partial sums, |qk| ~ 30
# (phi's exp branch, small normalisers), no gate, a grid wider than one block
LOWP_CASES = [
    pytest.param(2, 5, 9, 64, 3.0, True, MANY_SPLITS, id="B2-5x9-C64-many-splits"),
    pytest.param(1, 14, 14, 128, 30.0, True, LARGE_BLOCKS, id="14x14-C128-scale30"),
    pytest.param(1, 1, 33, 64, 1.0, False, MANY_SPLITS, id="1x33-C64-nogate"),
    pytest.param(1, 32, 32, 64, 30.0, True, LARGE_BLOCKS, id="32x32-C64-scale30"),
]


@pytest.mark.parametrize(("B", "H", "W", "C", "scale", "gate", "config"), LOWP_CASES, indirect=["config"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowp_operands_match_reference_rule(dtype, B, H, W, C, scale, gate, config, device):
    inputs = make_inputs(B, H, W, C, device, dtype=dtype, scale=scale, gate=gate)
    check(inputs, (H, W), C // 32)


@pytest.mark.parametrize("config", [MANY_SPLITS], indirect=True)
def test_lowp_operands_leave_fp32_unchanged(config, device, monkeypatch):
    """lowp_dot_precision applies to bf16/fp16 activations only: fp32 results are bitwise those of "tf32"."""
    inputs = make_inputs(2, 5, 7, 64, device, scale=3.0)
    dy = torch.randn(2, 35, 64, device=device)
    y1, g1 = run(la.linear_attention, inputs, (5, 7), 2, dy)
    monkeypatch.setattr(la, "CONFIG", TF32_MANY_SPLITS)
    y2, g2 = run(la.linear_attention, inputs, (5, 7), 2, dy)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"d{name} differs from the tf32 configuration's"


@pytest.mark.parametrize("config", [LARGE_BLOCKS], indirect=True)
def test_strided_views_and_expanded_cotangent(config, device):
    """Inputs that are slices of wider tensors (token stride > channels, odd batch strides), a gate with
    non-contiguous channels, and y.sum()'s cotangent (all strides 0)."""
    B, H, W, C = 2, 6, 5, 64
    N = H * W
    ref = make_inputs(B, H, W, C, device)
    wide = torch.randn(B + 1, N, 3 * C + 8, device=device)  # e.g. a wider GEMM output; the op reads slices
    with torch.no_grad():
        wide[1:, :, 8: 8 + 2 * C] = ref["qk"]
        wide[1:, :, 8 + 2 * C:] = ref["v"]
    wide.requires_grad_()
    qk, v = wide[1:, :, 8: 8 + 2 * C], wide[1:, :, 8 + 2 * C:]
    g = ref["g"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert qk.stride(1) == 3 * C + 8 and v.stride(0) == N * (3 * C + 8) and g.stride(-1) != 1
    w = ref["lepe_weight"].detach().requires_grad_()
    b = ref["lepe_bias"].detach().requires_grad_()
    la.linear_attention(qk, v, g, w, b, (H, W), 2).sum().backward()

    y64, grads64 = reference64(ref, (H, W), 2, torch.ones(B, N, C, device=device))
    assert_matches("dqk", wide.grad[1:, :, 8: 8 + 2 * C], grads64["qk"])
    assert_matches("dv", wide.grad[1:, :, 8 + 2 * C:], grads64["v"])
    assert_matches("dg", g.grad, grads64["g"])
    assert_matches("dlepe_weight", w.grad, grads64["lepe_weight"])
    assert_matches("dlepe_bias", b.grad, grads64["lepe_bias"])
    assert torch.count_nonzero(wide.grad[0]) == 0 and torch.count_nonzero(wide.grad[1:, :, :8]) == 0
    y = la.linear_attention(qk.detach(), v.detach(), g.detach(), w.detach(), b.detach(), (H, W), 2)
    assert_matches("y", y, y64)


def test_64bit_token_offsets(device):
    """Token offsets past 2^31 elements: qk is a view whose token stride is about 2^30 elements (the
    buffer is mostly untouched virtual memory), so int32 offset arithmetic would read the wrong place."""
    B, H, W, C = 1, 1, 3, 32
    stride = 2**30 + 2**20
    try:
        buffer = torch.empty(3 * stride, dtype=torch.bfloat16, device=device)
    except RuntimeError as err:
        pytest.skip(f"cannot reserve a {3 * stride * 2 / 2**30:.1f} GiB buffer here: {err}")
    inputs = make_inputs(B, H, W, C, device, dtype=torch.bfloat16)
    qk = buffer.as_strided((B, H * W, 2 * C), (3 * stride, stride, 1))
    qk.copy_(inputs["qk"].detach())
    args = {**inputs, "qk": qk}
    y = la.linear_attention(*(args[k] for k in GRAD_NAMES), (H, W), 1)
    y_contiguous = la.linear_attention(*(inputs[k] for k in GRAD_NAMES), (H, W), 1)
    assert torch.equal(y, y_contiguous)


@pytest.mark.parametrize("config", [MANY_SPLITS], indirect=True)
def test_deterministic(config, device):
    inputs = make_inputs(2, 5, 7, 64, device, scale=3.0)
    dy = torch.randn(2, 35, 64, device=device)
    y1, g1 = run(la.linear_attention, inputs, (5, 7), 2, dy)
    y2, g2 = run(la.linear_attention, inputs, (5, 7), 2, dy)
    assert torch.equal(y1, y2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"d{name} differs between two runs"


@pytest.mark.parametrize("config", [TRIG_TABLE], indirect=True)
def test_rope_table_is_the_reference_table(config, device):
    """trig="table": the kernels gather exactly the reference's float64-computed table, rounded to float32,
    at angles beyond 2000 rad."""
    for H, W, C in ((2050, 3, 64), (2, 2047, 96), (5, 7, 32)):
        assert torch.equal(la.rope_cos_sin(H, W, C, device), rope_table(H, W, C, device=device))


@pytest.mark.parametrize("config", [COMPUTED_TRIG], indirect=True)
def test_rope_angles_accurate_at_large_grids(config, device):
    """trig="compute": the kernels' cos/sin of angle = pos * theta (angles beyond 2000 rad) against float64
    cos/sin of the same float32 angles (the reference frequencies rounded to float32): within a few float32
    ulps."""
    for H, W, C in ((2050, 3, 64), (2, 2047, 96)):
        out = la.rope_cos_sin(H, W, C, device).double()
        theta = rope_frequencies(C).float()
        rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        angles = torch.cat([rows[..., None] * theta, cols[..., None] * theta], dim=-1).double().to(device)
        exact = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        err = (out - exact).abs().max().item()
        assert err <= 3e-7, f"{H}x{W} C={C}: cos/sin error {err:.2e}"
        assert (out - rope_table(H, W, C, device=device).double()).abs().max().item() <= 1e-4


@pytest.mark.parametrize("config", [DEFAULT], indirect=True)
def test_reduced_rope_angles_accurate_at_large_grids(config, device):
    """trig="reduced" (the default): cos/sin of the float32 angles reduced to [-pi, pi], against float64 cos/sin
    of the same angles: within the hardware approximation's 5e-7 (on a GPU; the interpreter evaluates the
    reduced angle with numpy, so there this checks the reduction), up to angles of 300,000 rad."""
    theta = rope_frequencies(64).float()
    for H, W in ((2050, 3), (2, 2047), (1, 300_000)):
        first = max(0, W - 5)  # the last five columns (the largest angles)
        out = la.rope_cos_sin(H, W, 64, device)[:, first:].double()
        rows, cols = torch.meshgrid(torch.arange(H), torch.arange(first, W), indexing="ij")
        angles = torch.cat([rows[..., None] * theta, cols[..., None] * theta], dim=-1).double().to(device)
        exact = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
        err = (out - exact).abs().max().item()
        assert err <= 1e-6, f"{H}x{W}: cos/sin error {err:.2e}"


@pytest.mark.parametrize("config", [DEFAULT], indirect=True)
def test_reduced_rope_falls_back_past_its_range(config, device, monkeypatch):
    """Past REDUCED_TRIG_MAX_POSITION the launchers take trig="compute" (the reduction is exact below 2^16
    turns only)."""
    monkeypatch.setattr(la, "REDUCED_TRIG_MAX_POSITION", 100)
    assert la._trig_args(3, 100, 64, device)[2] == "reduced"
    assert la._trig_args(3, 101, 64, device)[2] == "compute"
    assert la._trig_args(101, 3, 64, device)[2] == "compute"


@pytest.mark.parametrize("config", [LARGE_BLOCKS], indirect=True)
def test_torch_compile_fullgraph(config, device):
    """torch.compile(fullgraph=True) traces through the custom op (fake impls, autograd) without breaks."""
    inputs = make_inputs(1, 5, 6, 64, device)
    dy = torch.randn(1, 30, 64, device=device)
    compiled = torch.compile(la.linear_attention, fullgraph=True, backend="aot_eager")
    y_c, g_c = run(compiled, inputs, (5, 6), 2, dy)
    y_e, g_e = run(la.linear_attention, inputs, (5, 6), 2, dy)
    assert torch.equal(y_c, y_e)
    for name in g_e:
        assert torch.equal(g_c[name], g_e[name]), f"d{name}: compiled != eager"


@pytest.mark.parametrize("config", [LARGE_BLOCKS], indirect=True)
def test_torch_compile_dynamic_grid(config, device):
    """Under torch.compile(dynamic=True) the grid arrives as SymInts; two grids, one compiled graph."""
    def attention(qk, v, g, w, b, H):
        return la.linear_attention(qk, v, g, w, b, (H, v.shape[1] // H), 2)

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager", dynamic=True)
    for H, W in ((4, 5), (6, 7)):
        args = [t.detach() for t in make_inputs(1, H, W, 64, device).values()]
        assert torch.equal(compiled(*args, H), attention(*args, H))


@pytest.mark.parametrize("config", [LARGE_BLOCKS], indirect=True)
@pytest.mark.parametrize("gate", [True, False])
def test_opcheck(gate, config, device):
    inputs = make_inputs(1, 3, 4, 32, device, gate=gate)
    args = [inputs[k] for k in GRAD_NAMES]
    for gate_silu in (False, True):
        torch.library.opcheck(la.linear_attention_fwd_op, (*args, 3, 4, 1, gate_silu))
        y, kv, ksum = la.linear_attention_fwd_op(*args, 3, 4, 1, gate_silu)
        detached = [x.detach() if x is not None else None for x in args]
        torch.library.opcheck(la.linear_attention_bwd_op,
                              (torch.randn_like(y), *detached, kv.detach(), ksum.detach(), 3, 4, 1, gate_silu))


def _bad(**changes):
    """Valid arguments (B=1, 4x8 grid, C=64, 2 heads) with some replaced."""
    t = {k: (x.detach() if x is not None else None) for k, x in make_inputs(1, 4, 8, 64, "cpu").items()}
    t.update({"hw": (4, 8), "num_heads": 2})
    t.update(changes)
    return t


BAD_INPUTS = [
    pytest.param(lambda: _bad(v=torch.randn(1, 32, 48), qk=torch.randn(1, 32, 96), g=torch.randn(1, 32, 48),
                              lepe_weight=torch.randn(48, 1, 3, 3), lepe_bias=torch.randn(48), num_heads=1),
                 "multiple of 32", id="C48"),
    pytest.param(lambda: _bad(hw=(4, 7)), "does not match the grid 4x7", id="H*W!=N"),
    pytest.param(lambda: _bad(hw=(4, 8.0)), "pair of positive ints", id="float-hw"),
    pytest.param(lambda: _bad(num_heads=4), "2 heads", id="heads"),
    pytest.param(lambda: _bad(qk=torch.randn(1, 32, 64)), r"qk: expected shape \(1, 32, 128\)", id="qk-shape"),
    pytest.param(lambda: _bad(g=torch.randn(2, 32, 64)), r"g: expected shape \(1, 32, 64\)", id="g-shape"),
    pytest.param(lambda: _bad(v=torch.randn(32, 64)), "3-D", id="v-2d"),
    pytest.param(lambda: _bad(lepe_weight=torch.randn(64, 3, 3)), r"lepe_weight: expected shape", id="w-shape"),
    pytest.param(lambda: _bad(lepe_bias=torch.randn(32)), r"lepe_bias: expected shape \(64,\)", id="b-shape"),
    pytest.param(lambda: _bad(g=torch.randn(1, 32, 64, dtype=torch.bfloat16)), "activation dtype", id="mixed-dtype"),
    pytest.param(lambda: _bad(v=torch.randint(0, 3, (1, 32, 64))), "got torch.int64", id="int-v"),
    pytest.param(lambda: _bad(v=torch.randn(1, 32, 64, dtype=torch.float64), qk=torch.randn(1, 32, 128).double(),
                              g=torch.randn(1, 32, 64).double()), "got torch.float64", id="float64"),
    pytest.param(lambda: _bad(lepe_bias=torch.randn(64, dtype=torch.float64)), "float32 or the activation",
                 id="param-dtype"),
    pytest.param(lambda: _bad(g=torch.randn(1, 32, 64, device="meta")), "one device", id="mixed-devices"),
    pytest.param(lambda: _bad(lepe_bias=[0.0] * 64), "lepe_bias: expected a torch.Tensor", id="not-tensor"),
]


@pytest.mark.parametrize(("make", "match"), BAD_INPUTS)
def test_bad_inputs_raise(make, match):
    args = make()
    with pytest.raises(ValueError, match=match):
        la.linear_attention(*(args[k] for k in GRAD_NAMES), args["hw"], args["num_heads"])


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(la, "interpreter_enabled", lambda: False)
    args = _bad()
    with pytest.raises(ValueError, match="expected CUDA tensors"):
        la.linear_attention(*(args[k] for k in GRAD_NAMES), args["hw"], args["num_heads"])


def test_bad_config():
    with pytest.raises(ValueError, match="power of two >= 16"):
        la.LinearAttentionConfig(bwd_kv_block_n=48)
    with pytest.raises(ValueError, match="lowp_dot_precision"):
        la.LinearAttentionConfig(lowp_dot_precision="bf16")
    with pytest.raises(ValueError, match=r"fwd_out_maxnreg: expected 0 \(no cap\)"):
        la.LinearAttentionConfig(fwd_out_maxnreg=300)
    assert la.LinearAttentionConfig().with_overrides(["bwd_q_maxnreg=168"]).bwd_q_maxnreg == 168


def test_launched_variants_compile_for_hopper():
    """What the block launches beyond the four attention kernels' basic variants (``test_kernels_compile_for_hopper``)
    and otherwise runs only through the interpreter here compiles for sm_90, no GPU needed: the stencils' row walks
    (cpe + LayerNorm, SiLU, transposed), the forward's output pass that keeps the pre-gate output (WRITE_O) and
    the backward's element-wise gate pass from it, and the gate pass as the output pass again (GATE_GRAD,
    ``SAVE_ATTENTION_OUTPUT = False``)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton install has no bundled ptxas: cannot compile for CUDA here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_registers.py"
    done = subprocess.run([sys.executable, str(script), "--dtype", "bf16", "--hw", "24", "40", "--stencils",
                           "--recompute-gate"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # the table's (kernel, variant) columns: "{dtype:5s} {kernel:28s} {variant:12s} ..."
    compiled = {(r[6:34].strip(), r[35:47].strip()) for r in done.stdout.splitlines() if r.startswith("bf16")}
    wanted = {("_stencil_walk_kernel", f"KIND {k}") for k in range(3)}
    wanted |= {("_la_fwd_out_kernel", "WRITE_O"), ("_la_gate_grad_kernel", ""), ("_la_fwd_out_kernel", "GATE_GRAD")}
    assert wanted <= compiled, done.stdout


def test_kernels_compile_for_hopper():
    """The compiled (non-interpreter) path: every kernel at the default configuration compiles for sm_90
    with Triton's CUDA backend, no GPU needed (a subprocess without TRITON_INTERPRET)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton install has no bundled ptxas: cannot compile for CUDA here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    done = subprocess.run([sys.executable, str(script), "--resource-usage", "default"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0 and "all kernels compiled" in done.stdout, done.stdout + done.stderr[-3000:]
