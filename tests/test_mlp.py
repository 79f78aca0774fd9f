"""The chunked, recomputing MLP (mlla_fast.mlp) against the block's nn.Module MLP."""

import pytest
import torch

import mlla_fast.mlp as chunked
from mlla_fast.reference.block import Mlp


def _grads(fn, mlp, h, dy):
    y = fn(h)
    return (y, *torch.autograd.grad(y, [h, *mlp.parameters()], dy.to(y.dtype)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_chunked_mlp_matches_the_module_in_float64(monkeypatch, approximate):
    """Several chunks (one of them short), output and every gradient equal to float64 rounding."""
    monkeypatch.setattr(chunked, "HIDDEN_CHUNK", 96 * 7)
    torch.manual_seed(0)
    mlp = Mlp(24, 96, act_layer=lambda: torch.nn.GELU(approximate=approximate)).double()
    h = torch.randn(2, 25, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 25, 24, dtype=torch.float64)
    assert chunked.chunked_mlp_supported(mlp, h)
    expected = _grads(mlp, mlp, h, dy)
    got = _grads(lambda x: chunked.chunked_mlp(mlp, x), mlp, h, dy)
    for name, a, b in zip(["y", "dh", "dfc1.weight", "dfc1.bias", "dfc2.weight", "dfc2.bias"], got, expected,
                          strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_chunked_mlp_under_autocast_is_as_accurate_as_pytorch(monkeypatch):
    """bf16 autocast: the same dtypes as the module under autocast, and errors against the float64 truth
    no larger than 1.25x those of PyTorch's own autocast computation."""
    monkeypatch.setattr(chunked, "HIDDEN_CHUNK", 256 * 300)
    torch.manual_seed(1)
    mlp = Mlp(64, 256)
    h = torch.randn(3, 1000, 64, requires_grad=True)
    dy = torch.randn(3, 1000, 64)
    mlp64 = Mlp(64, 256).double()
    mlp64.load_state_dict(mlp.state_dict())
    h64 = h.detach().double().requires_grad_()
    truth = _grads(mlp64, mlp64, h64, dy.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chunked.chunked_mlp_supported(mlp, h)
        torch_out = _grads(mlp, mlp, h, dy)
        ours = _grads(lambda x: chunked.chunked_mlp(mlp, x), mlp, h, dy)
    for a, b, t in zip(ours, torch_out, truth, strict=True):
        assert a.dtype == b.dtype
        err_ours = (a.double() - t).abs().max() / t.abs().max()
        err_torch = (b.double() - t).abs().max() / t.abs().max()
        assert err_ours <= 1.25 * err_torch + 1e-6, f"{err_ours:.2e} vs PyTorch {err_torch:.2e}"


def test_unsupported_mlps_are_left_to_pytorch():
    h = torch.randn(1, 4, 8)
    assert not chunked.chunked_mlp_supported(Mlp(8, 16, act_layer=torch.nn.ReLU), h)
    assert not chunked.chunked_mlp_supported(Mlp(8, 16, drop=0.1).train(), h)
    assert chunked.chunked_mlp_supported(Mlp(8, 16, drop=0.1).eval(), h)
    assert not chunked.chunked_mlp_supported(Mlp(8, 16), h.bfloat16())  # no autocast: PyTorch raises its own error
