"""One low-precision copy of a model's parameters per forward, made by a few multi-tensor kernels.

Under autocast every fused layer casts the fp32 weights and biases its GEMMs take to the compute dtype where it
uses them, as ``F.linear`` would: about 300 small cast kernels in one MLLA-UNet-T training step (224², batch 48,
bf16; 0.51 ms of its 30.4 ms GPU time on an H200, session 13, and in a CUDA graph a gap of about 1.5 µs after
each). ``cast_parameters(module, x)`` casts all of a module's fp32 parameters at once, for the duration of one
forward, into one flat buffer (``torch._foreach_copy_``: one multi-tensor kernel per hundred or so tensors), and
``cast(t, dtype)`` returns t's copy from that buffer (a view) where there is one, else ``t.to(dtype)``: the same
values, bit for bit. ``cast_cat`` returns the concatenation of several parameters' copies, a view of the buffer
when they lie next to each other in it (``cast_parameters`` takes an ``order`` for that), so that a layer whose
GEMM runs on stacked weights needs no concatenation kernel either.

The copies are made inside the forward, so a CUDA graph that captures the forward captures the cast too, and
replays it after each optimizer step. Under ``torch.compile`` nothing is cached (the compiler fuses casts itself).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["cast", "cast_cat", "cast_parameters"]

_local = threading.local()


class _Copies:
    """The flat low-precision buffer and, by parameter id, (parameter, offset, view)."""

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype):
        self.dtype = dtype
        sizes = [p.numel() for p in params]
        self.flat = torch.empty(sum(sizes), dtype=dtype, device=params[0].device)
        views, self.entries, offset = [], {}, 0
        for p, n in zip(params, sizes, strict=True):
            view = self.flat[offset:offset + n].view(p.shape)
            views.append(view)
            self.entries[id(p)] = (p, offset, view)
            offset += n
        with torch.no_grad():
            torch._foreach_copy_(views, [p.detach() for p in params])

    def get(self, t: Tensor, dtype: torch.dtype) -> tuple[int, Tensor] | None:
        """(offset, copy) of parameter t, or of a view of one that covers it whole in its own layout (such as the
        (C_out, C_in) view of a 1x1 convolution's weight); None where there is no copy."""
        if dtype != self.dtype:
            return None
        base = t._base
        if (base is not None and t.is_contiguous() and t.numel() == base.numel()
                and t.storage_offset() == base.storage_offset()):
            entry = self.entries.get(id(base))
            if entry is not None and entry[0] is base:
                return entry[1], entry[2].view(t.shape)
        entry = self.entries.get(id(t))
        if entry is None or entry[0] is not t:
            return None
        return entry[1], entry[2]


def _active() -> _Copies | None:
    return None if torch.compiler.is_compiling() else getattr(_local, "copies", None)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, from the active ``cast_parameters`` buffer where t is one of its parameters (a view, no
    kernel). Like ``Tensor.to``, t itself when it already has the dtype."""
    copies = _active()
    hit = None if copies is None or t.dtype == dtype else copies.get(t, dtype)
    return t.to(dtype) if hit is None else hit[1]


def cast_cat(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``torch.cat([cast(t, dtype) for t in tensors])`` (along dim 0): a view of the active buffer where the
    tensors' copies lie there one after the other, in this order; a single tensor is ``cast(t, dtype)``."""
    if len(tensors) == 1:
        return cast(tensors[0], dtype)
    copies = _active()
    if copies is not None:
        hits = [copies.get(t, dtype) for t in tensors]
        if all(h is not None and h[1].shape[1:] == hits[0][1].shape[1:] for h in hits) and all(
                a[0] + a[1].numel() == b[0] for a, b in itertools.pairwise(hits)):
            start, rows = hits[0][0], sum(h[1].shape[0] for h in hits)
            return copies.flat[start:start + sum(h[1].numel() for h in hits)].view(rows, *hits[0][1].shape[1:])
    return torch.cat([cast(t, dtype) for t in tensors])


@contextlib.contextmanager
def cast_parameters(module: nn.Module, x: Tensor, order: Iterable[Tensor] = ()) -> Iterator[None]:
    """Within the context, ``cast`` and ``cast_cat`` serve module's fp32 parameters on x's device from one copy in
    autocast's dtype for that device, made on entry. Nothing is made (the context does nothing) without autocast
    on x's device or to a dtype other than fp32, under ``torch.compile``, or inside another such context.

    order: parameters to place first, in this order (for ``cast_cat``'s views); the others follow in
    ``module.parameters()`` order."""
    device_type = x.device.type
    if (_active() is not None or torch.compiler.is_compiling() or not torch.is_autocast_enabled(device_type)
            or torch.get_autocast_dtype(device_type) == torch.float32):
        yield
        return
    seen, params = set(), []
    for p in (*order, *module.parameters()):
        if id(p) not in seen and p.dtype == torch.float32 and p.device == x.device and p.is_contiguous():
            seen.add(id(p))
            params.append(p)
    if not params:
        yield
        return
    _local.copies = _Copies(params, torch.get_autocast_dtype(device_type))
    try:
        yield
    finally:
        _local.copies = None
