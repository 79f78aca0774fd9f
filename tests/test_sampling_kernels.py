"""The EDSM / EUSM / final-expand kernels (kernels/sampling.py) against the float64 reference ops.

The three Triton ops (stride-2 DW conv + ReLU, DW transposed conv, 4x4 pixel shuffle + LayerNorm)
and the composed PatchMerging, PatchExpand and final x4 expand: outputs and the gradients of every
input and parameter on fresh random inputs, odd and even grids, BatchNorm in training and eval mode
(running statistics included), low precision, the golden tensors of the released code,
torch.compile, the custom-op registrations and the input checks. Every buffer the kernels allocate
is poisoned with NaN, so an element a kernel fails to write fails the comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mlla_fast.kernels import dwconv, sampling
from mlla_fast.kernels import layer_norm as ln
from mlla_fast.kernels.sampling import (
    dwconv_stride2_relu,
    dwconv_transpose2x,
    final_expand,
    final_head,
    module_args,
    patch_expand,
    patch_merging,
    pixel_shuffle4_layernorm,
)
from mlla_fast.reference.ops import (
    dwconv_stride2_relu_ref,
    dwconv_transpose2x_ref,
    final_expand_ref,
    final_head_ref,
    patch_expand_ref,
    patch_merging_ref,
    pixel_shuffle4_layernorm_ref,
)
from mlla_fast.reference.sampling import FinalPatchExpand_X4, PatchExpand, PatchMerging

from golden import golden_module, load_golden
from tolerance import FP32_RTOL, assert_matches

# (B, H, W, C, input_relu): odd and even grids, a 1xN row, an Nx1 column, batch 1 and 2, C = 32 ... 256
# (96: a partial channel block; 256: several channel blocks).
STENCIL_SHAPES = [(1, 7, 7, 32, False), (2, 13, 17, 64, True), (1, 1, 9, 32, True), (2, 14, 14, 96, False),
                  (1, 5, 1, 256, True)]
# (B, H, W, C) of the 16C-channel expand output fed to the shuffle + LayerNorm.
SHUFFLE_SHAPES = [(1, 7, 7, 32), (2, 13, 17, 64), (1, 1, 9, 32), (2, 3, 4, 96)]
STENCILS = ["dwconv_stride2_relu", "dwconv_transpose2x", "pixel_shuffle4_layernorm"]
LOWP = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(sampling, ln, dwconv)


def leaves(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


# ----------------------------------------------------------------------------------------------
# The three Triton ops
# ----------------------------------------------------------------------------------------------


def stencil_inputs(op: str, B: int, H: int, W: int, C: int, device: str, dtype=torch.float32,
                   param_dtype=torch.float32) -> list[torch.Tensor]:
    """The op's tensor arguments: activation (centred near zero, so ReLUs cut), then parameters."""
    if op == "pixel_shuffle4_layernorm":
        y = (torch.randn(B, H * W, 16 * C, device=device) + 0.5).to(dtype)
        params = [1.0 + 0.5 * torch.randn(C, device=device), 0.5 * torch.randn(C, device=device)]
        return [y, *(p.to(param_dtype) for p in params)]
    x = (torch.randn(B, H * W, C, device=device) + 0.2).to(dtype)
    params = [torch.randn(C, 1, 3, 3, device=device) * 0.3]
    if op == "dwconv_stride2_relu":
        params.append(torch.randn(C, device=device) * 0.3)
    return [x, *(p.to(param_dtype) for p in params)]


def run_stencil(op: str, inputs: list[torch.Tensor], hw: tuple[int, int], input_relu: bool, grad: torch.Tensor,
                reference: bool = False) -> list[torch.Tensor]:
    """[output, gradient of every input] of the kernel op (or its reference) for the output gradient grad."""
    if op == "dwconv_stride2_relu":
        fn = dwconv_stride2_relu_ref if reference else dwconv_stride2_relu
        out = fn(inputs[0], inputs[1], inputs[2], hw, input_relu=input_relu)
    elif op == "dwconv_transpose2x":
        fn = dwconv_transpose2x_ref if reference else dwconv_transpose2x
        out = fn(inputs[0], inputs[1], hw, input_relu=input_relu)
    else:
        fn = pixel_shuffle4_layernorm_ref if reference else pixel_shuffle4_layernorm
        out = fn(inputs[0], hw, inputs[1], inputs[2], 1e-5)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad)]


def out_tokens(op: str, B: int, H: int, W: int, C: int) -> tuple[int, int, int]:
    if op == "dwconv_stride2_relu":
        return B, ((H + 1) // 2) * ((W + 1) // 2), C
    if op == "dwconv_transpose2x":
        return B, 4 * H * W, C
    return B, 16 * H * W, C


def result_names(op: str) -> list[str]:
    return {"dwconv_stride2_relu": ["y", "dx", "d weight", "d bias"],
            "dwconv_transpose2x": ["y", "dx", "d weight"],
            "pixel_shuffle4_layernorm": ["out", "dy", "d norm_weight", "d norm_bias"]}[op]


def check_stencil_fp32(op: str, B: int, H: int, W: int, C: int, input_relu: bool, device: str) -> None:
    inputs = stencil_inputs(op, B, H, W, C, device)
    grad = torch.randn(out_tokens(op, B, H, W, C), device=device)
    got = run_stencil(op, leaves(inputs), (H, W), input_relu, grad)
    ref = run_stencil(op, leaves(inputs, torch.float64), (H, W), input_relu, grad.double(), reference=True)
    for name, g, r in zip(result_names(op), got, ref, strict=True):
        assert g.dtype == torch.float32, f"{op} {name}: dtype {g.dtype}"
        assert_matches(f"{op} {name}", g, r)


@pytest.mark.parametrize("shape", STENCIL_SHAPES, ids=lambda s: "B{}_{}x{}_C{}_relu{}".format(*s))
@pytest.mark.parametrize("op", ["dwconv_stride2_relu", "dwconv_transpose2x"])
def test_stencil_fp32_matches_float64_reference(op, shape, device):
    check_stencil_fp32(op, *shape, device)


@pytest.mark.parametrize("shape", SHUFFLE_SHAPES, ids=lambda s: "B{}_{}x{}_C{}".format(*s))
def test_pixel_shuffle4_layernorm_fp32_matches_float64_reference(shape, device):
    check_stencil_fp32("pixel_shuffle4_layernorm", *shape, False, device)


@pytest.mark.parametrize("op", STENCILS)
def test_many_tiles_per_program(op, device, monkeypatch):
    """Small tiles and three partial programs: each reducing program loops over several tiles, some past the end."""
    for key in sampling.CONFIGS:
        monkeypatch.setitem(sampling.CONFIGS, key, sampling.LaunchConfig(tile_elements=1024, block_c=32))
    monkeypatch.setattr(sampling, "INTERPRETER_PARTIAL_PROGRAMS", 3)
    check_stencil_fp32(op, 2, 5, 7, 64, True, device)


# (B, H, W, input_relu): single pixels, single rows and columns, odd and mixed-parity grids.
PARITY_SHAPES = [(2, 1, 1, True), (1, 1, 6, False), (1, 6, 1, True), (2, 2, 3, True), (1, 3, 2, False),
                 (2, 9, 11, True), (1, 10, 7, True)]


@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=lambda s: "B{}_{}x{}_relu{}".format(*s))
@pytest.mark.parametrize("op", ["dwconv_stride2_relu", "dwconv_transpose2x"])
def test_parity_classes_on_odd_and_degenerate_grids(op, shape, device, monkeypatch):
    """The big-grid stencil runs one program per parity class (y % 2, x % 2) and token tile: on grids whose
    classes differ in size or are empty (H or W = 1 in the stride-2 backward), with tiles of 8 tokens and
    several partial programs per class, each looping over tiles, some past their class's end."""
    for key in sampling.CONFIGS:
        monkeypatch.setitem(sampling.CONFIGS, key, sampling.LaunchConfig(tile_elements=256, block_c=32))
    monkeypatch.setattr(sampling, "INTERPRETER_PARTIAL_PROGRAMS", 24)
    B, H, W, input_relu = shape
    check_stencil_fp32(op, B, H, W, 64, input_relu, device)


def test_stride2_relu_gradient_masks_are_exact(device):
    """Where an output or a ReLU'd input is exactly 0 the gradient is cut, as in PyTorch (relu' = [y > 0])."""
    B, H, W, C = 1, 6, 5, 32
    x = torch.randn(B, H * W, C, device=device)
    x[:, ::3] = 0.0
    w = torch.randn(C, 1, 3, 3, device=device)
    b = torch.full((C,), -0.5, device=device)
    grad = torch.randn(B, 9, C, device=device)
    got = run_stencil("dwconv_stride2_relu", leaves([x, w, b]), (H, W), True, grad)
    ref = run_stencil("dwconv_stride2_relu", leaves([x, w, b], torch.float64), (H, W), True, grad.double(),
                      reference=True)
    assert (got[0] == 0).any()
    for name, g, r in zip(result_names("dwconv_stride2_relu"), got, ref, strict=True):
        assert_matches(f"masked {name}", g, r)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("op", STENCILS)
def test_low_precision_activations_fp32_params(op, dtype, device):
    """bf16/fp16 activations with fp32 parameters (as under autocast): outputs and input gradients in the
    activation dtype, parameter gradients in fp32, errors within twice PyTorch's own low-precision error
    plus a floor."""
    B, H, W, C = 2, 7, 10, 64
    inputs = stencil_inputs(op, B, H, W, C, device, dtype=dtype)
    grad = torch.randn(out_tokens(op, B, H, W, C), device=device).to(dtype)
    got = run_stencil(op, leaves(inputs), (H, W), True, grad)
    ref = run_stencil(op, leaves(inputs, torch.float64), (H, W), True, grad.double(), reference=True)
    lowp = run_stencil(op, leaves(inputs, dtype), (H, W), True, grad, reference=True)
    for i, (name, g, r, lp) in enumerate(zip(result_names(op), got, ref, lowp, strict=True)):
        expected = dtype if i < 2 else torch.float32
        assert g.dtype == expected, f"{op} {name}: dtype {g.dtype}, expected {expected}"
        assert_matches(f"{op} {name}", g, r, lp, dtype=dtype)


@pytest.mark.parametrize("op", STENCILS)
def test_deterministic(op, device):
    B, H, W, C = 2, 9, 6, 64
    inputs = stencil_inputs(op, B, H, W, C, device)
    grad = torch.randn(out_tokens(op, B, H, W, C), device=device)
    first = run_stencil(op, leaves(inputs), (H, W), True, grad)
    second = run_stencil(op, leaves(inputs), (H, W), True, grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_non_contiguous_inputs(device):
    """A column slice of a wider activation and a transposed output gradient give the contiguous result."""
    B, H, W, C = 2, 5, 6, 64
    wide = torch.randn(B, H * W, 2 * C, device=device)
    w = torch.randn(C, 1, 3, 3, device=device)
    grad = torch.randn(B, C, 4 * H * W, device=device).transpose(1, 2)
    got = run_stencil("dwconv_transpose2x", leaves([wide[..., C:], w]), (H, W), False, grad)
    want = run_stencil("dwconv_transpose2x", leaves([wide[..., C:].contiguous(), w]), (H, W), False,
                       grad.contiguous())
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "op, args",
    [
        ("dwconv_stride2_relu_fwd", lambda d: (torch.randn(2, 15, 32, device=d), torch.randn(32, 1, 3, 3, device=d),
                                               torch.randn(32, device=d), 3, 5, True)),
        ("dwconv_stride2_relu_bwd", lambda d: (torch.randn(2, 6, 32, device=d), torch.randn(2, 15, 32, device=d),
                                               torch.randn(32, 1, 3, 3, device=d), torch.rand(2, 6, 32, device=d),
                                               3, 5, True)),
        ("dwconv_transpose2x_fwd", lambda d: (torch.randn(2, 15, 32, device=d), torch.randn(32, 1, 3, 3, device=d),
                                              3, 5, False)),
        ("dwconv_transpose2x_bwd", lambda d: (torch.randn(2, 60, 32, device=d), torch.randn(2, 15, 32, device=d),
                                              torch.randn(32, 1, 3, 3, device=d), 3, 5, True)),
        ("pixel_shuffle4_layernorm_fwd", lambda d: (torch.randn(1, 6, 512, device=d), torch.randn(32, device=d),
                                                    torch.randn(32, device=d), 2, 3, 1e-5, False)),
        ("pixel_shuffle4_layernorm_fwd", lambda d: (torch.randn(1, 6, 512, device=d, dtype=torch.bfloat16),
                                                    torch.randn(32, device=d), torch.randn(32, device=d), 2, 3, 1e-5,
                                                    True)),
        ("pixel_shuffle4_layernorm_bwd", lambda d: (torch.randn(1, 96, 32, device=d), torch.randn(1, 6, 512, device=d),
                                                    torch.randn(32, device=d), 2, 3, 1e-5)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_custom_op_registration(op, args, device):
    """Schema and fake (meta) implementation of each custom op."""
    torch.library.opcheck(getattr(torch.ops.mlla_fast, op).default, args(device),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# The composed ops
# ----------------------------------------------------------------------------------------------


def randomise_norms(module: torch.nn.Module) -> None:
    """Non-trivial BatchNorm/LayerNorm affine parameters and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
                m.num_batches_tracked.fill_(3)


# name: (reference module, kernel op, reference op, output shape)
COMPOSED = {
    "patch_merging": (PatchMerging, patch_merging, patch_merging_ref,
                      lambda B, H, W, C: (B, ((H + 1) // 2) * ((W + 1) // 2), 2 * C)),
    "patch_expand": (PatchExpand, patch_expand, patch_expand_ref, lambda B, H, W, C: (B, 4 * H * W, C // 2)),
    "final_expand": (FinalPatchExpand_X4, final_expand, final_expand_ref, lambda B, H, W, C: (B, 16 * H * W, C)),
}


def make_module(name: str, H: int, W: int, C: int) -> torch.nn.Module:
    module = COMPOSED[name][0]((H, W), C)
    randomise_norms(module)
    return module


def run_composed(name: str, module: torch.nn.Module, x: torch.Tensor, hw: tuple[int, int], grad: torch.Tensor,
                 reference: bool = False) -> tuple[list[str], list[torch.Tensor]]:
    """(names, [output, dx, d every parameter]) of the kernel op (or reference op) on module's parameters."""
    fn = COMPOSED[name][2 if reference else 1]
    params = [p for _, p in module.named_parameters()]
    out = fn(x, hw, *module_args(module))
    grads = torch.autograd.grad(out, [x, *params], grad)
    return ["y", "dx"] + [f"d {n}" for n, _ in module.named_parameters()], [out.detach(), *grads]


def check_composed_fp32(name: str, B: int, H: int, W: int, C: int, train: bool, device: str,
                        momentum: float | None = 0.1) -> None:
    module = make_module(name, H, W, C).to(device).train(train)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    module64 = copy.deepcopy(module).double()
    bn_input_grad = {}

    def keep_input_grad(_, args):
        args[0].register_hook(lambda g: bn_input_grad.setdefault("dz", g))

    if train and name != "final_expand":
        module64.conv[2].norm.register_forward_pre_hook(keep_input_grad)
    x = torch.randn(B, H * W, C, device=device)
    grad = torch.randn(COMPOSED[name][3](B, H, W, C), device=device)
    names, got = run_composed(name, module, x.clone().requires_grad_(), (H, W), grad)
    _, ref = run_composed(name, module64, x.double().requires_grad_(), (H, W), grad.double(), reference=True)
    for n, g, r in zip(names, got, ref, strict=True):
        assert g.dtype == torch.float32, f"{name} {n}: dtype {g.dtype}"
        if n == "d conv.2.conv.bias" and bn_input_grad:
            # A bias in front of a training-mode BatchNorm has an exactly cancelling gradient (sum over tokens of
            # the BatchNorm input gradient, whose mean BatchNorm removes): measure the error against the size
            # of the summands instead of against the cancelled sum.
            scale = bn_input_grad["dz"].abs().sum(dim=(0, 2, 3)).norm().item()
            err = (g.double() - r).norm().item()
            assert err <= FP32_RTOL * scale, f"{name} {n}: error {err:.3e} > {FP32_RTOL:.0e} x summands {scale:.3e}"
        else:
            assert_matches(f"{name} {n}", g, r)
    for (n, buf), (_, buf64) in zip(module.named_buffers(), module64.named_buffers(), strict=True):
        if buf.is_floating_point():
            assert_matches(f"{name} {n}", buf, buf64)
        else:
            assert torch.equal(buf.cpu(), buf64.cpu()), f"{name} {n}: {buf} != {buf64}"


# (B, H, W, C, train)
MERGING_SHAPES = [(2, 7, 7, 32, True), (1, 13, 17, 32, False), (2, 6, 8, 32, True), (1, 1, 9, 32, True)]
EXPAND_SHAPES = [(2, 7, 7, 64, True), (1, 13, 17, 32, False), (1, 1, 9, 64, True), (2, 4, 6, 32, True)]
FINAL_SHAPES = [(2, 7, 7, 32, False), (1, 13, 17, 32, False), (1, 1, 9, 64, False), (2, 14, 14, 96, False)]
SHAPE_ID = "B{}_{}x{}_C{}_train{}".format


@pytest.mark.parametrize("shape", MERGING_SHAPES, ids=lambda s: SHAPE_ID(*s))
def test_patch_merging_fp32_matches_float64_reference(shape, device):
    check_composed_fp32("patch_merging", *shape, device)


@pytest.mark.parametrize("shape", EXPAND_SHAPES, ids=lambda s: SHAPE_ID(*s))
def test_patch_expand_fp32_matches_float64_reference(shape, device):
    check_composed_fp32("patch_expand", *shape, device)


@pytest.mark.parametrize("shape", FINAL_SHAPES, ids=lambda s: SHAPE_ID(*s))
def test_final_expand_fp32_matches_float64_reference(shape, device):
    check_composed_fp32("final_expand", *shape, device)


@pytest.mark.parametrize("name", ["patch_merging", "patch_expand"])
def test_batch_norm_cumulative_average(name, device):
    """momentum=None: the running statistics are the cumulative average over num_batches_tracked."""
    check_composed_fp32(name, 2, 5, 6, 32, True, device, momentum=None)


@pytest.mark.parametrize("name", ["patch_merging", "patch_expand", "final_expand"])
def test_autocast_bf16(name, device):
    """Under autocast (fp32 parameters, bf16 GEMMs): the output has the dtype the reference op gives under the
    same autocast (bf16, or fp32 where autocast runs LayerNorm in fp32, as on CUDA) and every result is within
    twice the error of the reference op under the same autocast, plus a floor; parameter gradients stay fp32."""
    B, H, W, C = 2, 7, 6, 64
    module = make_module(name, H, W, C).to(device).train(name != "final_expand")
    modules = [copy.deepcopy(module) for _ in range(3)]
    modules[2].double()
    x = torch.randn(B, H * W, C, device=device)
    grad = torch.randn(COMPOSED[name][3](B, H, W, C), device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        names, got = run_composed(name, modules[0], x.clone().requires_grad_(), (H, W), grad)
        _, lowp = run_composed(name, modules[1], x.clone().requires_grad_(), (H, W), grad, reference=True)
    _, ref = run_composed(name, modules[2], x.double().requires_grad_(), (H, W), grad.double(), reference=True)
    assert got[0].dtype == lowp[0].dtype
    for n, g, r, lp in zip(names, got, ref, lowp, strict=True):
        if n.startswith("d "):
            assert g.dtype == torch.float32, f"{name} {n}: dtype {g.dtype}"
        assert_matches(f"{name} {n}", g, r, lp, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["patch_merging", "patch_expand", "final_expand"])
def test_compiles_without_graph_breaks(name, device):
    """The composed op inside torch.compile(fullgraph=True), forward and backward, matches eager exactly."""
    B, H, W, C = 2, 5, 3, 32
    module = make_module(name, H, W, C).to(device).train(name != "final_expand")
    compiled_module = copy.deepcopy(module)
    x = torch.randn(B, H * W, C, device=device)
    grad = torch.randn(COMPOSED[name][3](B, H, W, C), device=device)
    _, eager = run_composed(name, module, x.clone().requires_grad_(), (H, W), grad)
    fn = COMPOSED[name][1]
    compiled = torch.compile(lambda x, *args: fn(x, (H, W), *args), backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    out = compiled(xc, *module_args(compiled_module))
    got = [out.detach(), *torch.autograd.grad(out, [xc, *compiled_module.parameters()], grad)]
    for a, e in zip(got, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for a, e in zip(compiled_module.buffers(), module.buffers(), strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The fused output head (final expand + LayerNorm + 1x1 convolution, chunked over images)
# ----------------------------------------------------------------------------------------------


def head_inputs(B: int, H: int, W: int, C: int, K: int, device: str) -> list[torch.Tensor]:
    """x (B, H*W, C), expand weight (16C, C), LayerNorm weight and bias (C,), head weight (K, C, 1, 1)."""
    return [torch.randn(B, H * W, C, device=device), 0.2 * torch.randn(16 * C, C, device=device),
            1.0 + 0.3 * torch.randn(C, device=device), 0.3 * torch.randn(C, device=device),
            0.3 * torch.randn(K, C, 1, 1, device=device)]


def run_head(fn, inputs: list[torch.Tensor], hw: tuple[int, int], grad: torch.Tensor) -> list[torch.Tensor]:
    """[logits, d x, d every weight] of fn (final_head or final_head_ref) on leaves of the inputs."""
    out = fn(inputs[0], hw, *inputs[1:])
    return [out.detach(), *torch.autograd.grad(out, inputs, grad.to(out.dtype))]


HEAD_NAMES = ["logits", "dx", "d expand_weight", "d norm_weight", "d norm_bias", "d head_weight"]


@pytest.mark.parametrize("one_image_chunks", [False, True])
@pytest.mark.parametrize("shape", [(3, 3, 5, 32, 9), (1, 7, 7, 64, 2), (2, 1, 4, 96, 14), (2, 2, 3, 32, 8)],
                         ids=lambda s: "B{}_{}x{}_C{}_K{}".format(*s))
def test_final_head_fp32_matches_float64_reference(shape, one_image_chunks, device, monkeypatch):
    """Logits and every gradient by the fp32 rule, in one chunk and in one chunk per image (the chunks'
    parameter gradients summed)."""
    B, H, W, C, K = shape
    if one_image_chunks:
        monkeypatch.setattr(sampling, "HEAD_CHUNK", 16 * H * W * C)
        assert len(sampling._head_chunks(B, 16 * H * W * C)) == B
    inputs = head_inputs(B, H, W, C, K, device)
    grad = torch.randn(B, K, 4 * H, 4 * W, device=device)
    got = run_head(final_head, leaves(inputs), (H, W), grad)
    ref = run_head(final_head_ref, leaves(inputs, torch.float64), (H, W), grad)
    for n, g, r in zip(HEAD_NAMES, got, ref, strict=True):
        assert g.dtype == torch.float32, f"{n}: dtype {g.dtype}"
        assert_matches(n, g, r)


def test_final_head_autocast_bf16(device, monkeypatch):
    """Under autocast (fp32 parameters and input, bf16 GEMMs): logits in bf16 as the reference's convolution
    gives them, every result within twice the error of the reference under the same autocast plus a floor,
    fp32 gradients."""
    monkeypatch.setattr(sampling, "HEAD_CHUNK", 2 * 16 * 35 * 64)  # two images per chunk: chunks of 2, 2, 1
    B, H, W, C, K = 5, 5, 7, 64, 9
    inputs = head_inputs(B, H, W, C, K, device)
    grad = torch.randn(B, K, 4 * H, 4 * W, device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        got = run_head(final_head, leaves(inputs), (H, W), grad)
        lowp = run_head(final_head_ref, leaves(inputs), (H, W), grad)
    ref = run_head(final_head_ref, leaves(inputs, torch.float64), (H, W), grad)
    assert got[0].dtype == lowp[0].dtype == torch.bfloat16
    for n, g, r, lp in zip(HEAD_NAMES, got, ref, lowp, strict=True):
        if n != "logits":
            assert g.dtype == torch.float32, f"{n}: dtype {g.dtype}"
        assert_matches(n, g, r, lp, dtype=torch.bfloat16)


def test_final_head_keeps_only_its_input(device):
    """Saved for the backward: the input and the (cast) weights, nothing at 16C channels or 16x the tokens."""
    B, H, W, C, K = 2, 3, 4, 32, 5
    inputs = leaves(head_inputs(B, H, W, C, K, device))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        final_head(inputs[0], (H, W), *inputs[1:])
    # the head weight is kept as a (K', C) matrix, K' = K rounded up to sampling.CLASS_MULTIPLE (zero rows)
    expected = {t.shape for t in inputs} | {torch.Size((-(-K // sampling.CLASS_MULTIPLE) * sampling.CLASS_MULTIPLE, C))}
    assert saved and set(saved) <= expected, f"saved {saved}, expected only shapes among {expected}"


def test_final_head_compiles_without_graph_breaks(device, monkeypatch):
    """final_head inside torch.compile(fullgraph=True), over two chunks, forward and backward, equals eager."""
    monkeypatch.setattr(sampling, "HEAD_CHUNK", 16 * 12 * 32)
    B, H, W, C, K = 2, 3, 4, 32, 5
    inputs = head_inputs(B, H, W, C, K, device)
    grad = torch.randn(B, K, 4 * H, 4 * W, device=device)
    eager = run_head(final_head, leaves(inputs), (H, W), grad)
    compiled = torch.compile(lambda x, *w: final_head(x, (H, W), *w), backend="aot_eager", fullgraph=True)
    got = run_head(lambda x, hw, *w: compiled(x, *w), leaves(inputs), (H, W), grad)
    for n, a, e in zip(HEAD_NAMES, got, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=n)


def test_final_head_bad_input_raises_value_error(device):
    x, we, nw, nb, wh = head_inputs(1, 3, 4, 32, 5, device)
    with pytest.raises(ValueError, match="head_weight"):
        final_head(x, (3, 4), we, nw, nb, wh.view(5, 32))
    with pytest.raises(ValueError, match="head_weight"):
        final_head(x, (3, 4), we, nw, nb, wh[:, :16])
    with pytest.raises(ValueError, match="expand_weight"):
        final_head(x, (3, 4), we[:8], nw, nb, wh)
    with pytest.raises(ValueError, match="x"):
        final_head(x, (4, 4), we, nw, nb, wh)


@pytest.mark.parametrize("name, cls, filename", [
    ("patch_merging", PatchMerging, "patch_merging_c64_14x14.pt"),
    ("patch_expand", PatchExpand, "patch_expand_c128_7x7.pt"),
])
def test_golden(name, cls, filename, device):
    """The released module's weights, input, output and gradients: the fp32 kernel op on the float32 x, by the
    fp32 rule against the released code's float64 results."""
    data = load_golden(filename)
    module = golden_module(data, {cls.__name__: cls}).to(device).eval()
    x = data["x"].to(device).requires_grad_()
    names, got = run_composed(name, module, x, module.input_resolution, data["grad_out"].float().to(device))
    want = {"y": data["y"], "dx": data["grad_x"], **{f"d {k}": v for k, v in data["grad_params"].items()}}
    assert set(want) <= set(names)
    for n, g in zip(names, got, strict=True):
        if n in want:
            assert_matches(f"golden {name} {n}", g, want[n].to(device))


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _stencil_bad_cases(device):
    C = 64
    x = torch.randn(2, 12, C, device=device)
    w, b = torch.randn(C, 1, 3, 3, device=device), torch.randn(C, device=device)
    return [
        ("grid", lambda: dwconv_stride2_relu(x, w, b, (3, 5)), "does not match the grid 3x5"),
        ("grid values", lambda: dwconv_transpose2x(x, w, (0, 12)), "pair of positive integers"),
        ("grid type", lambda: dwconv_stride2_relu(x, w, b, 12), "pair of positive integers"),
        ("2-D x", lambda: dwconv_stride2_relu(x[0], w, b, (3, 4)), "3-D"),
        ("weight shape", lambda: dwconv_stride2_relu(x, w.view(C, 9), b, (3, 4)), r"\(64, 1, 3, 3\)"),
        ("weight channels", lambda: dwconv_transpose2x(x, w[:32], (3, 4)), r"\(64, 1, 3, 3\)"),
        ("bias shape", lambda: dwconv_stride2_relu(x, w, b[:32], (3, 4)), r"bias: expected shape \(64,\)"),
        ("integer x", lambda: dwconv_transpose2x(x.long(), w, (3, 4)), "floating-point"),
        ("integer weight", lambda: dwconv_stride2_relu(x, w.int(), b, (3, 4)), "float32, bfloat16 or float16"),
        ("float64 x", lambda: dwconv_stride2_relu(x.double(), w, b, (3, 4)), "float32, bfloat16 and float16"),
        ("empty batch", lambda: dwconv_transpose2x(x[:0], w, (3, 4)), "at least one sample"),
        ("mixed devices", lambda: dwconv_stride2_relu(x, w.to("meta"), b, (3, 4)), "on meta"),
        ("meta x", lambda: dwconv_transpose2x(x.to("meta"), w, (3, 4)), "need a CUDA tensor, got one on meta"),
        ("shuffle channels", lambda: pixel_shuffle4_layernorm(x[..., :40], (3, 4), b, b), r"16\*C channels .*, got 40"),
        ("shuffle norm", lambda: pixel_shuffle4_layernorm(x, (3, 4), b[:4], b[:5]),
         r"norm_bias: expected shape \(4,\), got \(5,\)"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_stencil_bad_input_raises_value_error(case, device):
    _, call, message = _stencil_bad_cases(device)[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_composed_bad_input_raises_value_error(device):
    C = 32
    x = torch.randn(2, 12, C, device=device)
    merging = PatchMerging((3, 4), C).to(device)
    args = list(module_args(merging))
    with pytest.raises(ValueError, match=r"expand_weight: expected shape \(256, 32, 1, 1\)"):
        patch_merging(x, (3, 4), args[0][:, :16], *args[1:])
    with pytest.raises(ValueError, match=r"dw_weight: expected shape \(256, 1, 3, 3\)"):
        patch_merging(x, (3, 4), args[0], args[1], args[2][:128], *args[3:])
    with pytest.raises(ValueError, match="reduce_weight: expected a \\(C_out, 256, 1, 1\\) 1x1 conv weight"):
        patch_merging(x, (3, 4), *args[:4], args[4].flatten(1), *args[5:])
    with pytest.raises(ValueError, match="expected a BatchNorm over 64 channels, got num_features=32"):
        patch_merging(x, (3, 4), *args[:6], torch.nn.BatchNorm2d(32))
    with pytest.raises(ValueError, match="expected a BatchNorm module"):
        patch_merging(x, (3, 4), *args[:6], torch.nn.LayerNorm(64))
    with pytest.raises(ValueError, match=r"expand_weight: expected shape \(256, 64, 1, 1\)"):
        patch_merging(torch.randn(2, 12, 64, device=device), (3, 4), *args)
    expanding = PatchExpand((3, 4), C).to(device)
    args = list(module_args(expanding))
    with pytest.raises(ValueError, match=r"norm_weight: expected shape \(16,\)"):
        patch_expand(x, (3, 4), *args[:6], args[6][:8], *args[7:])
    with pytest.raises(ValueError, match="token count 12 does not match the grid 4x4"):
        patch_expand(x, (4, 4), *args)
    with pytest.raises(ValueError, match="expected a PatchMerging, PatchExpand or FinalPatchExpand_X4, got Linear"):
        module_args(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"expand_weight: expected shape \(512, 32\)"):
        final_expand(x, (3, 4), torch.randn(256, C, device=device), torch.ones(C, device=device),
                     torch.zeros(C, device=device))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="need a CUDA tensor, got one on cpu"):
        dwconv_stride2_relu(x, torch.randn(32, 1, 3, 3), torch.randn(32), (2, 2))
