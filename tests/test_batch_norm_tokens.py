"""BatchNorm on token-major data (kernels/batch_norm.py through ``sampling._batch_norm_tokens``) against the module.

``_batch_norm_tokens(y, bn)`` for an ``nn.BatchNorm2d`` on the fused path runs the Triton statistics, apply and
backward kernels; the reference is a float64 copy of the module on the (B*N, C, 1, 1) view of the tokens. Checked:
outputs, the input and parameter gradients, and the running statistics and num_batches_tracked after two steps,
in training and eval mode, with and without affine parameters, momentum 0.1 and None (cumulative average),
track_running_stats False; a large common offset (the variance must not cancel); bf16 under CPU autocast; bitwise
determinism; torch.compile. The fused ReLU (``relu=True``) against the float64 ReLU of the module's output, and the
fused stem (``mlla_fast.layers.Stem``, each conv -> BatchNorm -> ReLU layer through ``sampling.image_batch_norm``)
against the float64 reference stem. Every buffer the kernels allocate is poisoned with NaN.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlla_fast.kernels import batch_norm, dwconv, sampling
from mlla_fast.layers import Stem
from mlla_fast.reference.sampling import Stem as ReferenceStem

from tolerance import FP32_RTOL, assert_matches, rel_err

NAMES = ["out", "dy", "dweight", "dbias"]
SHAPES = [(2, 37, 64), (3, 5, 96), (1, 49, 512), (4, 3, 32)]
# (training, affine, momentum, track_running_stats)
MODES = [
    (True, True, 0.1, True),
    (True, False, None, True),
    (True, True, None, True),
    (False, True, 0.1, True),
    (False, False, 0.1, True),
    (True, True, 0.1, False),
    (False, True, 0.1, False),
]


@pytest.fixture(autouse=True)
def _poison_outputs(poison_outputs):
    poison_outputs(batch_norm, dwconv, sampling)


def make_bn(C: int, affine: bool, momentum: float | None, track: bool, device: str) -> nn.BatchNorm2d:
    """A BatchNorm2d with non-trivial parameters and running statistics (and a count of 3 batches)."""
    bn = nn.BatchNorm2d(C, affine=affine, momentum=momentum, track_running_stats=track).to(device)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(1.0 + 0.5 * torch.randn(C))
            bn.bias.copy_(0.5 * torch.randn(C))
        if track:
            bn.running_mean.copy_(0.3 * torch.randn(C))
            bn.running_var.copy_(0.5 + torch.rand(C))
            bn.num_batches_tracked.fill_(3)
    return bn


def run(bn: nn.Module, y: torch.Tensor, g: torch.Tensor, fused: bool, relu: bool = False) -> tuple[torch.Tensor, ...]:
    """(output, dy, dweight, dbias) of bn, and with relu its ReLU, on tokens y (B, N, C) with output gradient g:
    through ``_batch_norm_tokens`` when fused, else through the module on the (B*N, C, 1, 1) view and F.relu."""
    y = y.detach().requires_grad_()
    B, N, C = y.shape
    if fused:
        out = sampling._batch_norm_tokens(y, bn, relu)
    else:
        out = bn(y.reshape(B * N, C, 1, 1)).view(B, N, C)
        out = F.relu(out) if relu else out
    params = [p for p in (bn.weight, bn.bias) if p is not None]
    grads = torch.autograd.grad(out, [y, *params], g.to(out.dtype))
    return (out, *grads)


def check_state(bn: nn.Module, ref: nn.Module) -> None:
    for name in ("running_mean", "running_var"):
        t, r = getattr(bn, name), getattr(ref, name)
        assert (t is None) == (r is None), name
        if t is not None:
            assert_matches(name, t, r)
    if ref.num_batches_tracked is not None:
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "train{}-affine{}-mom{}-track{}".format(*m))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_module(shape, mode, relu, device):
    """With relu, the reference is F.relu of the module's output: the fused ReLU's output, and dy, dweight and
    dbias of the ReLU-masked output gradient (the mask recomputed in the backward); the ReLU cuts part of the
    output in every case."""
    training, affine, momentum, track = mode
    B, N, C = shape
    bn = make_bn(C, affine, momentum, track, device).train(training)
    ref = copy.deepcopy(bn).double()
    for _ in range(2):
        y = torch.randn(B, N, C, device=device) * 2.0 + 0.7
        g = torch.randn(B, N, C, device=device)
        outs = run(bn, y, g, fused=True, relu=relu)
        refs = run(ref, y.double(), g.double(), fused=False, relu=relu)
        assert len(outs) == len(refs) == (4 if affine else 2)
        if relu:
            assert (refs[0] == 0).any() and (refs[0] > 0).any()
        for name, o, r in zip(NAMES, outs, refs, strict=False):
            assert o.dtype == torch.float32
            assert_matches(name, o, r)
        check_state(bn, ref)


@pytest.mark.parametrize("relu", [False, True])
def test_runs_the_triton_kernels(relu, device, monkeypatch):
    """On the fused path neither the forward nor the backward calls F.batch_norm (nor, with relu, F.relu)."""
    bn = make_bn(64, True, 0.1, True, device)

    def forbidden(*args, **kwargs):
        raise AssertionError("F.batch_norm or F.relu called on the fused path")

    monkeypatch.setattr(F, "batch_norm", forbidden)
    monkeypatch.setattr(F, "relu", forbidden)
    run(bn, torch.randn(2, 9, 64, device=device), torch.randn(2, 9, 64, device=device), fused=True, relu=relu)


@pytest.mark.parametrize("training", [True, False])
def test_large_offset(training, device):
    """x = 1000 + randn: E[x^2] - E[x]^2 in fp32 would lose the variance. The error may be at most that of
    PyTorch's own fp32 F.batch_norm (which rounds the mean to fp32 too) times two, and the running variance
    is held to the fp32 rule."""
    B, N, C = 3, 41, 64
    bn = make_bn(C, True, 0.1, True, device).train(training)
    with torch.no_grad():
        bn.running_mean.add_(1000.0)
    ref = copy.deepcopy(bn).double()
    lowp = copy.deepcopy(bn)
    y = 1000.0 + torch.randn(B, N, C, device=device)
    g = torch.randn(B, N, C, device=device)
    outs = run(bn, y, g, fused=True)
    refs = run(ref, y.double(), g.double(), fused=False)
    torch32 = run(lowp, y, g, fused=False)
    for name, o, r, t in zip(NAMES, outs, refs, torch32, strict=True):
        bound = max(FP32_RTOL, 2.0 * rel_err(t, r))
        assert rel_err(o, r) <= bound, f"{name}: {rel_err(o, r):.3e} > {bound:.3e}"
    check_state(bn, ref)
    if training:
        mean, var = torch.ops.mlla_fast.batch_norm_stats(y.reshape(-1, C))
        y64 = y.double().reshape(-1, C)
        assert_matches("mean", mean, y64.mean(0))
        assert_matches("var", var, y64.var(0, unbiased=False))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_autocast_bf16(training, relu, device):
    """bf16 tokens, fp32 parameters, under autocast: the output dtype F.batch_norm gives there, and the
    low-precision rule against float64 (PyTorch's own bf16 BatchNorm, then ReLU with relu, as the low-precision
    reference)."""
    B, N, C = 2, 37, 96
    bn = make_bn(C, True, 0.1, True, device).train(training)
    ref, lowp = copy.deepcopy(bn).double(), copy.deepcopy(bn)
    y = (torch.randn(B, N, C, device=device) * 2.0 + 0.7).to(torch.bfloat16)
    g = torch.randn(B, N, C, device=device).to(torch.bfloat16)
    device_type = torch.device(device).type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        outs = run(bn, y, g, fused=True, relu=relu)
        lows = run(lowp, y, g, fused=False, relu=relu)
        expected_dtype = F.batch_norm(y.reshape(-1, C), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                      False).dtype
    refs = run(ref, y.double(), g.double(), fused=False, relu=relu)
    assert outs[0].dtype == expected_dtype == lows[0].dtype
    assert outs[1].dtype == torch.bfloat16
    assert outs[2].dtype == outs[3].dtype == torch.float32
    for name, o, r, low in zip(NAMES, outs, refs, lows, strict=True):
        assert_matches(name, o, r, low, torch.bfloat16)
    check_state(bn, ref)


@pytest.mark.parametrize("training", [True, False])
def test_deterministic(training, device):
    B, N, C = 3, 53, 96
    bn = make_bn(C, True, 0.1, True, device).train(training)
    bn2 = copy.deepcopy(bn)
    y, g = torch.randn(B, N, C, device=device), torch.randn(B, N, C, device=device)
    a, b = run(bn, y, g, fused=True), run(bn2, y, g, fused=True)
    for t, u in zip(a, b, strict=True):
        assert torch.equal(t, u)
    assert torch.equal(bn.running_mean, bn2.running_mean) and torch.equal(bn.running_var, bn2.running_var)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_compiles_without_graph_breaks(training, relu, device):
    B, N, C = 2, 19, 64
    bn = make_bn(C, True, 0.1, True, device).train(training)
    bn_c = copy.deepcopy(bn)
    y, g = torch.randn(B, N, C, device=device), torch.randn(B, N, C, device=device)
    eager = run(bn, y, g, fused=True, relu=relu)
    compiled_fn = torch.compile(sampling._batch_norm_tokens, fullgraph=True, backend="aot_eager")
    yc = y.clone().requires_grad_()
    out = compiled_fn(yc, bn_c, relu)
    grads = torch.autograd.grad(out, [yc, bn_c.weight, bn_c.bias], g)
    for t, u in zip(eager, (out, *grads), strict=True):
        torch.testing.assert_close(u, t, rtol=1e-6, atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(bn_c, name)), name


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 37, 64), (2, 11, 320)], ids=lambda s: "x".join(map(str, s)))
def test_many_tiles_per_program(shape, training, relu, device, monkeypatch):
    """Small tiles: each program walks several row blocks, the last one partial, and the merge of the runs
    takes several steps (C = 320: a full and a partial channel block)."""
    monkeypatch.setattr(batch_norm, "TILE_ELEMENTS", 512)
    monkeypatch.setattr(batch_norm, "COMBINE_ROWS", 2)
    B, N, C = shape
    bn = make_bn(C, True, 0.1, True, device).train(training)
    ref = copy.deepcopy(bn).double()
    y, g = torch.randn(B, N, C, device=device) * 2.0 + 0.7, torch.randn(B, N, C, device=device)
    for name, o, r in zip(NAMES, run(bn, y, g, fused=True, relu=relu),
                          run(ref, y.double(), g.double(), fused=False, relu=relu), strict=True):
        assert_matches(name, o, r)
    check_state(bn, ref)


@pytest.mark.parametrize("relu", [False, True])
def test_falls_back_off_the_fused_path(relu, device):
    """float64 tokens are not on the fused path: F.batch_norm, as before."""
    bn = make_bn(32, True, 0.1, True, device).double()
    ref = copy.deepcopy(bn)
    y, g = (torch.randn(2, 5, 32, device=device, dtype=torch.float64) for _ in range(2))
    for name, o, r in zip(NAMES, run(bn, y, g, fused=True, relu=relu), run(ref, y, g, fused=False, relu=relu),
                          strict=True):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)
    check_state(bn, ref)


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("batch_norm_stats", lambda d: (torch.randn(37, 96, device=d),)),
        ("batch_norm_apply", lambda d: (torch.randn(37, 96, device=d).bfloat16(), torch.randn(96, device=d),
                                        torch.rand(96, device=d), torch.randn(96, device=d), None, 1e-5)),
        ("batch_norm_apply", lambda d: (torch.randn(37, 96, device=d), torch.randn(96, device=d),
                                        torch.rand(96, device=d), None, torch.randn(96, device=d), 1e-5, True)),
        ("batch_norm_bwd", lambda d: (torch.randn(37, 96, device=d), torch.randn(37, 96, device=d),
                                      torch.randn(96, device=d), torch.rand(96, device=d), torch.randn(96, device=d),
                                      None, 1e-5, True)),
        ("batch_norm_bwd", lambda d: (torch.randn(37, 96, device=d), torch.randn(37, 96, device=d),
                                      torch.randn(96, device=d), torch.rand(96, device=d), None, None, 1e-5, False)),
        ("batch_norm_bwd", lambda d: (torch.randn(37, 96, device=d).bfloat16(),
                                      torch.randn(37, 96, device=d).bfloat16(), torch.randn(96, device=d),
                                      torch.rand(96, device=d), torch.randn(96, device=d), torch.randn(96, device=d),
                                      1e-5, True, True)),
        ("batch_norm_bwd", lambda d: (torch.randn(37, 96, device=d), torch.randn(37, 96, device=d),
                                      torch.randn(96, device=d), torch.rand(96, device=d), None,
                                      torch.randn(96, device=d), 1e-5, False, True)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_custom_op_registration(op, args, device):
    """Schema and fake (meta) implementation of each custom op."""
    torch.library.opcheck(getattr(torch.ops.mlla_fast, op).default, args(device),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(("dtype", "param_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                    (torch.float16, torch.float32)])
def test_low_precision_without_autocast(dtype, param_dtype, device):
    """Low-precision tokens with parameters and running statistics in their dtype or in fp32 (both of which
    PyTorch's BatchNorm takes), in training mode: outputs and gradients in those dtypes, under the
    low-precision rule against float64."""
    B, N, C = 2, 29, 64
    bn = make_bn(C, True, 0.1, True, device).to(param_dtype)
    ref, lowp = copy.deepcopy(bn).double(), copy.deepcopy(bn)
    y = (torch.randn(B, N, C, device=device) * 2.0 + 0.7).to(dtype)
    g = torch.randn(B, N, C, device=device).to(dtype)
    outs = run(bn, y, g, fused=True)
    lows = run(lowp, y, g, fused=False)
    refs = run(ref, y.double(), g.double(), fused=False)
    for name, o, r, low in zip(NAMES, outs, refs, lows, strict=True):
        assert o.dtype == low.dtype, name
        assert_matches(name, o, r, low, dtype)
    for name in ("running_mean", "running_var"):
        t, r, low = getattr(bn, name), getattr(ref, name), getattr(lowp, name)
        assert t.dtype == param_dtype
        if param_dtype == torch.float32:
            assert_matches(name, t, r)
        else:
            assert_matches(name, t, r, low, param_dtype)


# ----------------------------------------------------------------------------------------------
# The fused stem: its conv -> BatchNorm -> [ReLU] layers on the token BatchNorm (sampling.image_batch_norm)
# ----------------------------------------------------------------------------------------------


STEM_SHAPES = [(2, 3, 16, 16), (2, 3, 8, 12)]


def make_stems(embed_dim: int, device: str) -> tuple[Stem, ReferenceStem]:
    """(fused Stem on the device, float64 reference Stem on the CPU) with the same non-trivial BatchNorm
    parameters and running statistics, the fused one loaded from the reference's state dict."""
    ref = ReferenceStem(3, embed_dim)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict(make_bn(m.num_features, True, 0.1, True, "cpu").state_dict())
    fast = Stem(3, embed_dim, backend="triton")
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    return fast.to(device), ref.double()


def stem_step(stem: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and every parameter gradient (by name) of stem on images x for output gradient g."""
    x = x.detach().requires_grad_()
    out = stem(x)
    names, params = zip(*stem.named_parameters(), strict=True)
    grads = torch.autograd.grad(out, [x, *params], g.to(out.dtype))
    return {"out": out.detach(), "dx": grads[0], **{f"d {n}": t for n, t in zip(names, grads[1:], strict=True)}}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", STEM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stem_matches_float64_reference(shape, training, device):
    """Two steps of the fused stem (fp32, backend "triton") against the float64 reference stem: output, input
    gradient, every parameter gradient, and the running statistics and num_batches_tracked after each step."""
    B, _, H, W = shape
    fast, ref = make_stems(32, device)
    fast.train(training)
    ref.train(training)
    for _ in range(2):
        x = torch.randn(shape)
        g = torch.randn(B, (H // 4) * (W // 4), 32)
        got = stem_step(fast, x.to(device), g.to(device))
        want = stem_step(ref, x.double(), g.double())
        assert got.keys() == want.keys()
        for name, r in want.items():
            assert got[name].dtype == torch.float32, name
            assert_matches(name, got[name].cpu(), r)
        for (name, t), r in zip(fast.named_buffers(), ref.buffers(), strict=True):
            if t.is_floating_point():
                assert_matches(name, t.cpu(), r)
            else:
                assert torch.equal(t.cpu(), r), name


def test_stem_runs_the_fused_batch_norm(device, monkeypatch):
    """The fused stem's BatchNorms and ReLUs run on the Triton kernels (neither F.batch_norm nor F.relu, forward
    or backward); backend "torch" keeps the reference (no ``image_batch_norm``)."""
    fast, _ = make_stems(32, device)
    x, g = torch.randn(2, 3, 8, 8, device=device), torch.randn(2, 4, 32, device=device)

    def forbidden(*args, **kwargs):
        raise AssertionError("called on the wrong path")

    with monkeypatch.context() as patch:
        patch.setattr(F, "batch_norm", forbidden)
        patch.setattr(F, "relu", forbidden)
        stem_step(fast, x, g)
    plain = Stem(3, 32, backend="torch").to(device)
    plain.load_state_dict(fast.state_dict())
    monkeypatch.setattr(sampling, "image_batch_norm", forbidden)
    stem_step(plain, x, g)


class _PlainBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass: not plain nn.BatchNorm2d, so its ConvLayer runs its own forward."""


def test_stem_other_norms_and_activations_fall_back(device):
    """A layer with a BatchNorm2d subclass or an activation other than ReLU runs the reference ConvLayer; the
    other layers stay fused, and the stem still matches the float64 reference."""
    fast, ref = make_stems(32, device)
    for stem in (fast, ref):
        stem.conv1.act = nn.SiLU()
        norm = stem.conv3[1].norm
        stem.conv3[1].norm = _PlainBatchNorm(norm.num_features).to(norm.weight)
        stem.conv3[1].norm.load_state_dict(norm.state_dict())
    x, g = torch.randn(2, 3, 12, 8), torch.randn(2, 6, 32)
    got = stem_step(fast, x.to(device), g.to(device))
    for name, r in stem_step(ref, x.double(), g.double()).items():
        assert_matches(name, got[name].cpu(), r)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_image_batch_norm_layouts(channels_last, training, device):
    """``image_batch_norm`` on a channels-last image (its tokens a view) and on an NCHW one (copied to tokens):
    a channels-last (B, C, H, W) result whose tokens are a view, matching the float64 module and F.relu, with
    the input and parameter gradients and the running statistics."""
    B, C, H, W = 2, 48, 5, 7
    bn = make_bn(C, True, 0.1, True, device).train(training)
    ref = copy.deepcopy(bn).double()
    x = torch.randn(B, C, H, W, device=device) + 0.3
    g = torch.randn(B, C, H, W, device=device)
    xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x.clone()
    xf.requires_grad_()
    out = sampling.image_batch_norm(xf, bn, relu=True)
    assert out.shape == (B, C, H, W) and out.is_contiguous(memory_format=torch.channels_last)
    assert out.permute(0, 2, 3, 1).is_contiguous()
    got = [out, *torch.autograd.grad(out, [xf, bn.weight, bn.bias], g)]
    x64 = x.double().requires_grad_()
    out64 = F.relu(ref(x64))
    want = [out64, *torch.autograd.grad(out64, [x64, ref.weight, ref.bias], g.double())]
    for name, o, r in zip(NAMES, got, want, strict=True):
        assert_matches(name, o, r)
    check_state(bn, ref)


@pytest.mark.parametrize(
    ("x", "channels", "match"),
    [(torch.randn(2, 16, 32), 32, "expected a \\(B, C, H, W\\) image"),
     (torch.randn(2, 32, 4, 4), 16, "num_features=16")],
    ids=["3-D", "channels"],
)
def test_image_batch_norm_bad_input_raises_value_error(x, channels, match, device):
    with pytest.raises(ValueError, match=match):
        sampling.image_batch_norm(x.to(device), nn.BatchNorm2d(channels).to(device), relu=True)
