"""Whole-step CUDA graph capture: one graph launch replaces the hundreds of small kernel launches of a step.

A training step of a small network such as MLLA-UNet-tiny is bound by Python and kernel-launch overhead,
not by the GPU: recorded once as a CUDA graph and replayed, the same kernels run back to back with no
host work between them. ``GraphedStep`` follows PyTorch's recipe for whole-network capture
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture):

* the step reads its inputs from static tensors, into which each call copies the new data;
* warm-up iterations run before capture on the side stream that is then captured, so that everything
  done once (Triton JIT compilation and autotuning, cuBLAS handles and workspaces, which are per stream,
  lazily created optimizer state such as AdamW's moments) happens outside the capture;
* the graph is replayed on the caller's current stream and returns the tensors the step returned at
  capture, which each replay overwrites in place.

What the step function must respect (otherwise capture fails, or replays silently compute something else):

* no host synchronisation (``.item()``, ``.cpu()``, printing a tensor, data-dependent Python branches,
  ``torch.cuda.synchronize``) and no pageable host-to-device copies;
* the same shapes, the same code path and the same tensors every time: Python-side values (a learning
  rate given as a float, a branch on a step count) are frozen at capture; anything that must change
  between replays must live in a device tensor that is updated in place;
* a training step begins with ``optimizer.zero_grad(set_to_none=True)`` so that the backward allocates
  the gradients inside the graph's memory pool, and uses an optimizer built with ``capturable=True``
  (for AdamW: the step count and bias corrections on the device);
* autocast, if any, is entered inside the step, so that its cast weights are made (and freed) within the
  captured work rather than cached from an earlier call;
* CUDA random numbers (dropout, drop-path) are graph-safe: each replay draws fresh ones. Reading or
  setting the CUDA RNG state during capture (``torch.cuda.get_rng_state``, which
  ``torch.utils.checkpoint`` does by default) is an error before PyTorch 2.10.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_WARMUP = 3
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one warm-up and capture stream of every GraphedStep on device. cuBLAS keeps a workspace per stream
    it has run on (on an H100 two of 32 MiB, cuBLAS's and cuBLASLt's) for the rest of the process, so a new
    stream per capture left 66 MiB allocated per graph (session 8's probe); torch.cuda.graph's own default
    capture stream is likewise made once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _describe(t: Tensor) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check_tensors(inputs: Sequence[Any]) -> None:
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise ValueError(f"GraphedStep: input {i}: expected a torch.Tensor, got {type(t).__name__}")


def _check_cuda_inputs(inputs: Sequence[Tensor]) -> torch.device:
    """The one CUDA device all inputs are on; ValueError when CUDA is missing or an input is elsewhere."""
    if not inputs:
        raise ValueError("GraphedStep: expected at least one input tensor (it names the device to capture on)")
    _check_tensors(inputs)
    if not torch.cuda.is_available():
        raise ValueError("GraphedStep: CUDA graphs need a CUDA device, and torch.cuda.is_available() is False")
    for i, t in enumerate(inputs):
        if t.device.type != "cuda":
            raise ValueError(f"GraphedStep: input {i}: expected a CUDA tensor, got a {_describe(t)}")
    devices = {t.device for t in inputs}
    if len(devices) > 1:
        raise ValueError(f"GraphedStep: expected all inputs on one CUDA device, got {sorted(map(str, devices))}")
    return inputs[0].device


def _check_replay_inputs(static: Sequence[Tensor], inputs: Sequence[Any]) -> None:
    """ValueError unless inputs match the captured static inputs one for one in shape, dtype and device:
    the graph reads fixed addresses with fixed sizes, so anything else cannot be copied in."""
    if len(inputs) != len(static):
        raise ValueError(f"GraphedStep: the graph was captured with {len(static)} inputs, got {len(inputs)}")
    _check_tensors(inputs)
    for i, (s, t) in enumerate(zip(static, inputs, strict=True)):
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
            raise ValueError(f"GraphedStep: input {i}: expected a {_describe(s)} (as captured), got a {_describe(t)}")


class GraphedStep:
    """``fn(*inputs)`` captured once as a CUDA graph, replayed on every call with new inputs.

    Construction runs ``fn`` ``warmup`` times for real on a side stream (with the example inputs: for a
    training step, these are ``warmup`` genuine optimizer steps on that batch), then captures one more
    call; the capture itself computes nothing. Each call then copies its inputs into the static buffers
    and replays the graph on the current stream, without synchronising.

    Args:
        fn: the step, e.g. zero_grad, forward under autocast, loss, backward, optimizer step; it returns
            the tensors to read after a replay (a loss, logits, a tuple of them, or None).
        *example_inputs: CUDA tensors with the shapes and dtypes of every later call's inputs (copied,
            not kept: the step reads the graph's own static copies).
        warmup: eager calls before the capture (at least 1; 3 as in PyTorch's examples, which also lets
            lazily built state such as optimizer moments and autotuning caches settle).
        capture_error_mode: passed to ``torch.cuda.graph``; "thread_local" tolerates CUDA calls from
            other threads (e.g. a data loader pinning memory) during the capture.

    Calls return the object ``fn`` returned during capture: its tensors are overwritten by the next
    replay, so clone what must outlive it. Raises ``ValueError`` without CUDA, for inputs that are not
    CUDA tensors, and for call inputs whose shape, dtype or device differ from the example inputs.
    """

    def __init__(self, fn: Callable[..., Any], *example_inputs: Tensor, warmup: int = DEFAULT_WARMUP,
                 capture_error_mode: str = "global"):
        if not callable(fn):
            raise ValueError(f"GraphedStep: fn must be callable, got {type(fn).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be an int >= 1 (eager calls before capture), got {warmup!r}")
        self.device = _check_cuda_inputs(example_inputs)
        self.fn = fn
        with torch.no_grad():
            self.static_inputs = tuple(t.detach().clone() for t in example_inputs)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream()
            side = _side_stream(self.device)
            side.wait_stream(caller)  # the copies above were made on the caller's stream
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*self.static_inputs)
            caller.wait_stream(side)
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode=capture_error_mode):
                self.output = fn(*self.static_inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        """Copy inputs into the static buffers, replay, and return the (static) output of the step."""
        _check_replay_inputs(self.static_inputs, inputs)
        with torch.no_grad():
            for static, new in zip(self.static_inputs, inputs, strict=True):
                static.copy_(new)
        self.graph.replay()
        return self.output


@contextlib.contextmanager
def preserved_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo, in place, whatever the body does to the model, the optimizer and the random number generators.

    ``GraphedStep``'s warm-up runs real training steps; inside this context they leave no trace, so a
    captured run trains exactly as many steps, from the same state, as an eager one. On exit every parameter
    and buffer (BatchNorm statistics included) gets its old value back, optimizer state that existed gets
    its old values, state the body created (lazily, on a first step) is zeroed (which is the fresh state of
    Adam-type optimizers: moments and step count zero), and the CPU and CUDA generators are reset. Restoring
    copies into the same tensors, so a graph captured inside the context still reads and writes them.
    """
    with torch.no_grad():
        tensors = [*model.parameters(), *model.buffers()]
        saved = [t.detach().clone() for t in tensors]
        saved_state = {id(p): {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}
                       for p, state in optimizer.state.items()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved, strict=True):
                t.copy_(value)
            for p, state in optimizer.state.items():
                old = saved_state.get(id(p), {})
                for key, value in state.items():
                    if isinstance(value, Tensor):
                        if key in old:
                            value.copy_(old[key])
                        else:
                            value.zero_()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
