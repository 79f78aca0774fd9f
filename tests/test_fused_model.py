"""The drop-in MLLABlock and MLLAUNet on the fused kernels against the float64 reference.

Without CUDA the kernels run through Triton's interpreter on CPU tensors (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import mlla_fast
import mlla_fast.block
from mlla_fast.kernels import mlp as kmlp
from mlla_fast.linear import compute_dtype
from mlla_fast.mlp import TRITON_MLP_MAX_CHANNELS, chunked_mlp_supported
from mlla_fast.reference import MLLABlock as ReferenceBlock
from mlla_fast.reference import MLLAUNet as ReferenceUNet
from mlla_fast.reference.ops import drop_path_mask

from golden import load_golden
from tolerance import assert_matches, rel_err

SMALL_UNET = dict(embed_dim=32, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))


def _randomise(module: torch.nn.Module, std: float = 0.2) -> None:
    """Random parameters and BatchNorm statistics, so that no path is hidden by a zero or an identity."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, std)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def _compare(fast: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor, device: str) -> None:
    """Output, input gradient and every parameter gradient of fast (fp32) against ref in float64."""
    ref64 = ref.double()
    x64 = x.double().requires_grad_()
    y64 = ref64(x64)
    grad_out = torch.randn_like(y64)
    (y64 * grad_out).sum().backward()

    fast = fast.to(device)
    xf = x.to(device).requires_grad_()
    y = fast(xf)
    y.backward(grad_out.to(device=device, dtype=y.dtype))
    assert_matches("output", y.cpu(), y64)
    assert_matches("input gradient", xf.grad.cpu(), x64.grad)
    ref_params = dict(ref64.named_parameters())
    fast_params = dict(fast.named_parameters())
    for name, p in fast_params.items():
        assert p.grad is not None, f"{name} got no gradient"
        if name in _zero_by_construction(fast):
            weight_grad = fast_params[name.replace(".bias", ".weight")].grad
            assert p.grad.norm() <= 1e-5 * weight_grad.norm(), f"{name}: gradient should vanish"
            continue
        assert_matches(f"gradient of {name}", p.grad.cpu(), ref_params[name].grad)


def _zero_by_construction(model: torch.nn.Module) -> set[str]:
    """Biases of convolutions followed by a BatchNorm in training mode: their exact gradient is 0
    (the batch mean removes them), so only its smallness can be checked, not a relative error."""
    names = set()
    for name, m in model.named_modules():
        conv, norm = getattr(m, "conv", None), getattr(m, "norm", None)
        if isinstance(norm, torch.nn.BatchNorm2d) and norm.training and getattr(conv, "bias", None) is not None:
            names.add(f"{name}.conv.bias")
    return names


@pytest.mark.parametrize(("dim", "heads", "hw", "batch"), [(64, 2, (7, 9), 2), (96, 3, (5, 6), 1), (32, 1, (1, 13), 3)])
def test_fused_block_matches_reference(dim, heads, hw, batch, device):
    ref = ReferenceBlock(dim, hw, heads)
    _randomise(ref)
    fast = mlla_fast.MLLABlock(dim, hw, heads, backend="triton")
    fast.load_state_dict(ref.state_dict(), strict=True)
    _compare(fast, ref, torch.randn(batch, hw[0] * hw[1], dim), device)


def test_fused_block_recomputing_attention_output(device, monkeypatch):
    """SAVE_ATTENTION_OUTPUT = False (the backward's gate pass as the output pass again, not element-wise from the
    saved pre-gate output): the block still matches the reference, output and every gradient."""
    monkeypatch.setattr(mlla_fast.attention, "SAVE_ATTENTION_OUTPUT", False)
    test_fused_block_matches_reference(64, 2, (7, 9), 2, device)


def test_fused_block_on_another_grid(device):
    ref = ReferenceBlock(64, (8, 8), 2)
    _randomise(ref)
    fast = mlla_fast.MLLABlock(64, (8, 8), 2, backend="triton").to(device)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 5 * 11, 64)
    y64 = ref.double()(x.double(), (5, 11))
    assert_matches("output", fast(x.to(device), (5, 11)).cpu(), y64)


@pytest.mark.parametrize("train", [False, True])
def test_fused_unet_matches_reference(train, device):
    ref = ReferenceUNet(img_size=64, num_classes=3, drop_path_rate=0.0, **SMALL_UNET)
    _randomise(ref)
    fast = mlla_fast.MLLAUNet(img_size=64, num_classes=3, drop_path_rate=0.0, backend="triton", **SMALL_UNET)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref.train(train)
    fast.train(train)
    _compare(fast, ref, torch.randn(2, 3, 32, 64), device)
    if train:
        for (name, a), b in zip(fast.named_buffers(), ref.buffers(), strict=True):
            if "running" in name:
                assert rel_err(a.cpu(), b) <= 1e-5, name


def test_fused_unet_golden(device):
    data = load_golden("unet_tiny_64px.pt")
    config = {k: v for k, v in data["config"].items() if k not in ("cls", "B")}
    model = mlla_fast.MLLAUNet(**config, backend="triton").to(device).eval()
    model.load_state_dict(data["state_dict"], strict=True)
    y = model(data["x"].to(device))
    assert_matches("golden U-Net output", y.cpu(), data["y"])


def test_backends_switch_and_agree(monkeypatch, device):
    ref = ReferenceBlock(64, (6, 6), 2)
    _randomise(ref)
    x = torch.randn(2, 36, 64, device=device)
    monkeypatch.setenv("MLLA_FAST_BACKEND", "torch")
    plain = mlla_fast.MLLABlock(64, (6, 6), 2).to(device)
    plain.load_state_dict(ref.state_dict())
    assert plain.backend == "torch"
    monkeypatch.setenv("MLLA_FAST_BACKEND", "triton")
    fused = mlla_fast.MLLABlock(64, (6, 6), 2).to(device)
    fused.load_state_dict(ref.state_dict())
    assert fused.backend == "triton"
    assert rel_err(fused(x), plain(x).double()) <= 1e-5


def test_bad_backend_environment(monkeypatch):
    monkeypatch.setenv("MLLA_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="MLLA_FAST_BACKEND must be one of"):
        mlla_fast.MLLABlock(64, (6, 6), 2)


def test_triton_backend_where_it_cannot_run(monkeypatch, device):
    block = mlla_fast.MLLABlock(64, (6, 6), 2, backend="triton").to(device)
    with pytest.raises(ValueError, match=r"float32, bfloat16 and float16, got torch\.float64"):
        block.double()(torch.randn(1, 36, 64, dtype=torch.float64, device=device))
    block.float()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        block.cpu()(torch.randn(1, 36, 64))
    auto = mlla_fast.MLLABlock(64, (6, 6), 2, backend="auto")
    assert auto(torch.randn(1, 36, 64)).shape == (1, 36, 64)


def test_triton_backend_rejects_other_head_sizes(device):
    block = mlla_fast.MLLABlock(64, (6, 6), 1, backend="triton").to(device)
    with pytest.raises(ValueError, match="32 channels per head"):
        block(torch.randn(1, 36, 64, device=device))


def test_activation_checkpointing_and_drop_path(device):
    torch.manual_seed(1)
    block = mlla_fast.MLLABlock(64, (5, 5), 2, drop_path=0.5, backend="triton").to(device).train()
    x = torch.randn(4, 25, 64, device=device, requires_grad=True)
    torch.manual_seed(7)
    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    y.sum().backward()
    grad_ckpt = x.grad.clone()
    x.grad = None
    torch.manual_seed(7)
    block(x).sum().backward()
    assert torch.equal(grad_ckpt, x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_drop_path_scale_draws_the_reference_mask(dtype, device):
    """The fused MLP's drop-path factor takes the mask that ``add_drop_path`` would draw for the MLP's output
    (B, N, C) in the compute dtype, from the same RNG state, and leaves the RNG where that draw leaves it; also
    for h in fp32 with a bf16/fp16 compute dtype (autocast)."""
    p = 0.3
    mlp_out = torch.empty(64, 25, 32, dtype=dtype, device=device)
    torch.manual_seed(11)
    mask = drop_path_mask(mlp_out, p)
    after = torch.rand(16, device=device)
    assert 0 < mask.sum() < mask.numel(), "no sample or every sample dropped"
    for h in (mlp_out, mlp_out.float()):
        torch.manual_seed(11)
        scale = mlla_fast.block.drop_path_scale(h, dtype, p)
        assert scale.dtype == torch.float32 and scale.shape == (64,)
        assert torch.equal(scale, mask.reshape(-1).float() * (1.0 / (1.0 - p)))
        assert torch.equal(torch.rand(16, device=device), after)


def _triton_mlp_supported_with_fp32(mlp, h):
    """``triton_mlp_supported`` without its rule that fp32 on CUDA stays on cuBLAS (a speed rule: the kernels
    compute fp32 with exact products), so that the fused drop-path is checked in fp32 on CUDA too."""
    return (chunked_mlp_supported(mlp, h) and h.shape[-1] <= TRITON_MLP_MAX_CHANNELS
            and kmlp.supported(h, compute_dtype(h)) is None)


@pytest.mark.parametrize("save_output", [False, True], ids=["recompute_o", "save_o"])
def test_drop_path_matches_reference_backend(save_output, device, monkeypatch):
    """Training with drop-path: the fused block draws the reference's per-sample masks (the same RNG use)
    and scales the kept samples alike; output, input and parameter gradients agree with backend='torch'.
    The attention branch accumulates into the residual with the scale in its output pass, and the MLP branch
    runs on the Triton MLP with the scale in its kernels (both asserted), its token blocks straddling samples
    (N = 25), dropped and kept samples in the batch."""
    monkeypatch.setattr(mlla_fast.block, "triton_mlp_supported", _triton_mlp_supported_with_fp32)
    monkeypatch.setattr(mlla_fast.attention, "SAVE_ATTENTION_OUTPUT", save_output)
    fused_calls, attention_calls = [], []
    triton_mlp = mlla_fast.block.triton_mlp
    gv_linear_attention = mlla_fast.attention.gv_linear_attention

    def spy(mlp, h, residual=None, scale=None):
        fused_calls.append((residual is not None, scale))
        return triton_mlp(mlp, h, residual=residual, scale=scale)

    def attention_spy(*args, **kwargs):
        attention_calls.append((kwargs["residual"] is not None, kwargs["scale"]))
        return gv_linear_attention(*args, **kwargs)

    monkeypatch.setattr(mlla_fast.block, "triton_mlp", spy)
    monkeypatch.setattr(mlla_fast.attention, "gv_linear_attention", attention_spy)
    ref = ReferenceBlock(64, (5, 5), 2, drop_path=0.5)
    _randomise(ref)
    x = torch.randn(8, 25, 64, device=device)
    dy = torch.randn(8, 25, 64, device=device)
    results = {}
    for backend in ("torch", "triton"):
        block = mlla_fast.MLLABlock(64, (5, 5), 2, drop_path=0.5, backend=backend).to(device).train()
        block.load_state_dict(ref.state_dict())
        torch.manual_seed(3)
        xb = x.clone().requires_grad_()
        y = block(xb)
        y.backward(dy)
        results[backend] = (y.detach(), xb.grad, {n: p.grad for n, p in block.named_parameters()})
        if backend == "torch":
            assert rel_err(y.detach(), block.eval()(x).double()) > 1e-2, "no path was dropped"
    assert len(fused_calls) == 1, "the fused block did not run the Triton MLP"
    assert len(attention_calls) == 1, "the fused block did not run the fused attention"
    for what, (has_residual, scale) in (("attention", attention_calls[0]), ("Triton MLP", fused_calls[0])):
        assert has_residual and scale is not None, f"the drop-path scale was not fused into the {what}"
        assert (scale == 0).any() and (scale == 2.0).any() and ((scale == 0) | (scale == 2.0)).all()
    assert 25 % kmlp.FWD_BLOCK_M != 0 and kmlp.FWD_BLOCK_M < 8 * 25
    (y_ref, dx_ref, grads_ref), (y, dx, grads) = results["torch"], results["triton"]
    assert rel_err(y, y_ref.double()) <= 1e-5
    assert rel_err(dx, dx_ref.double()) <= 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, grads_ref[name].double()) <= 1e-5, name


def test_convergence_matches_reference(device):
    """A tiny network trained from one seed on both backends: the loss agrees at every step."""
    losses = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = mlla_fast.MLLAUNet(img_size=32, num_classes=3, drop_path_rate=0.0, backend=backend,
                                   **SMALL_UNET).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 32, 32, generator=gen).to(device)
        target = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        curve = []
        for _ in range(12):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[backend] = torch.tensor(curve)
    assert losses["torch"][-1] < 0.8 * losses["torch"][0], "the tiny network did not learn"
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-3, atol=1e-4)


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct activation storages that autograd keeps from module(x) for the backward
    (the parameters, which exist anyway, are not counted)."""
    storages: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def test_fused_block_keeps_few_activations_for_the_backward(device, monkeypatch):
    """What the fused block saves for its backward, as a multiple of its input: about 6.4x (inputs of the
    kernels and GEMMs; the MLP's hidden activations, the LayerNorms' inputs r and the first one's output h, the
    SiLU gate, qk and the attention's output are recomputed; 8.4x while h and the attention's output were kept,
    10.4x while qk was too), under 25% of the reference's ~29x; with the attention's pre-gate output kept for the
    backward's element-wise gate pass (SAVE_ATTENTION_OUTPUT, the default), exactly one input's worth more."""
    ref = ReferenceBlock(64, (16, 16), 2).to(device)
    fast = mlla_fast.MLLABlock(64, (16, 16), 2, backend="triton").to(device)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 256, 64, device=device, requires_grad=True)
    fused = {}
    for save in (False, True):
        monkeypatch.setattr(mlla_fast.attention, "SAVE_ATTENTION_OUTPUT", save)
        fused[save] = _saved_bytes(fast, x)
    reference = _saved_bytes(ref, x)
    input_bytes = x.numel() * x.element_size()
    assert fused[False] <= 6.5 * input_bytes, f"fused block saves {fused[False] / input_bytes:.1f}x its input"
    assert fused[False] <= 0.25 * reference, \
        f"fused {fused[False] / input_bytes:.1f}x vs reference {reference / input_bytes:.1f}x"
    assert fused[True] == fused[False] + input_bytes, (fused, input_bytes)
