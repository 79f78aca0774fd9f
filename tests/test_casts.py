"""One low-precision copy of a model's parameters per forward (``mlla_fast/casts.py``).

Checked: ``cast`` inside ``cast_parameters`` gives the bits of ``Tensor.to`` as views of one buffer, ``cast_cat`` a
view where the copies are adjacent and a concatenation where they are not; the context does nothing without a
low-precision autocast, outside it, or nested; and the fused MLLA-UNet under bf16 autocast gives bitwise the same
loss and gradients with the copies as without them (one training step through Triton's interpreter on the CPU).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlla_fast
from mlla_fast import casts, model


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4), nn.LayerNorm(4))


def test_cast_is_a_view_of_one_buffer_with_the_bits_of_to():
    m = _module()
    x = torch.randn(2, 8)
    params = list(m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16), casts.cast_parameters(m, x):
        copies = [casts.cast(p, torch.bfloat16) for p in params]
        flat = casts._active().flat
        whole_view = casts.cast(m[0].weight.view(-1), torch.bfloat16)  # a view covering a parameter: served
        part_view = casts.cast(m[0].weight[:, :4], torch.bfloat16)  # part of one: cast
    assert whole_view.data_ptr() == copies[0].data_ptr() and whole_view.shape == (128,)
    assert part_view.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    assert torch.equal(part_view, m[0].weight[:, :4].to(torch.bfloat16))
    for p, c in zip(params, copies, strict=True):
        assert c.dtype == torch.bfloat16 and c.shape == p.shape
        assert torch.equal(c.view(torch.int16), p.detach().to(torch.bfloat16).view(torch.int16))
        assert c.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    assert casts._active() is None


def test_cast_outside_or_for_other_tensors_is_to():
    m = _module()
    other = torch.randn(3, 3)
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts.cast_parameters(m, x):
        got = casts.cast(other, torch.bfloat16)
        assert torch.equal(got, other.to(torch.bfloat16))
        assert casts.cast(m[0].weight, torch.float16).dtype == torch.float16  # not the buffer's dtype
        assert casts.cast(other, torch.float32) is other
    assert torch.equal(casts.cast(m[0].weight, torch.bfloat16), m[0].weight.to(torch.bfloat16))


def test_context_does_nothing_without_autocast():
    m = _module()
    x = torch.randn(2, 8)
    with casts.cast_parameters(m, x):
        assert casts._active() is None


def test_nested_context_keeps_the_outer_copies():
    m = _module()
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts.cast_parameters(m, x):
        outer = casts._active()
        with casts.cast_parameters(m[0], x):
            assert casts._active() is outer
        assert casts._active() is outer


def test_cast_cat_is_a_view_where_adjacent():
    torch.manual_seed(0)
    m = nn.Linear(8, 4)
    a, b = nn.Parameter(torch.randn(3, 8)), nn.Parameter(torch.randn(5, 8))
    m.a, m.b = a, b
    other = torch.randn(2, 8)  # not a parameter of m
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts.cast_parameters(m, x, order=[a, b]):
        flat = casts._active().flat
        view = casts.cast_cat([a, b], torch.bfloat16)
        assert view.shape == (8, 8) and view.data_ptr() == flat.data_ptr()
        assert torch.equal(view, torch.cat([a, b]).to(torch.bfloat16))
        for parts in ([b, a], [a, other], [a, m.weight]):  # not adjacent in this order, or not cached
            got = casts.cast_cat(parts, torch.bfloat16)
            assert got.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
            assert torch.equal(got, torch.cat(parts).to(torch.bfloat16))
        assert casts.cast_cat([b], torch.bfloat16).data_ptr() == flat.data_ptr() + 3 * 8 * 2


def _step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def test_fused_unet_is_bitwise_the_same_with_the_copies(monkeypatch, device):
    if device != "cpu":
        pytest.skip("the CPU autocast run through the interpreter")
    torch.manual_seed(0)
    net = mlla_fast.create_model("mlla_unet_tiny", num_classes=3, img_size=32, backend="triton").eval()
    x = torch.randn(1, 3, 32, 32)
    y = torch.randint(0, 3, (1, 32, 32))
    made = []
    real = casts._Copies

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(casts, "_Copies", counting)
    loss, grads = _step(net, x, y)
    assert made == [1]
    monkeypatch.setattr(model, "cast_parameters", lambda *args, **kwargs: contextlib.nullcontext())
    loss_plain, grads_plain = _step(net, x, y)
    assert made == [1]
    assert torch.equal(loss, loss_plain)
    assert sum(g is not None for g in grads) > 100
    for g, g_plain in zip(grads, grads_plain, strict=True):
        assert (g is None and g_plain is None) or torch.equal(g, g_plain)
