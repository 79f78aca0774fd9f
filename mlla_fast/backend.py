"""Choosing between the fused Triton kernels and the pure-PyTorch reference.

``backend="auto"`` (the default) takes the fused kernels for CUDA tensors when Triton is installed
and the reference otherwise; ``"triton"`` demands the kernels and raises where they cannot run;
``"torch"`` always runs the reference. The environment variable ``MLLA_FAST_BACKEND`` sets the
default for modules built with ``backend=None``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MLLA_FAST_BACKEND"


def default_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def check_backend(name: str | None) -> str:
    """Validate a backend name; None means the environment's default."""
    if name is None:
        return default_backend()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return name


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (its index, else the current one); 1 elsewhere."""
    if device.type != "cuda":
        return 1
    return _cuda_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def fused_supported(x: torch.Tensor) -> str | None:
    """None when the fused kernels can run on x; otherwise the reason they cannot."""
    if not TRITON_INSTALLED:
        return "Triton is not installed"
    if x.device.type != "cuda" and not (interpreter_enabled() and x.device.type == "cpu"):
        return f"the fused kernels need a CUDA tensor, got one on {x.device.type}"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the fused kernels support float32, bfloat16 and float16, got {x.dtype}"
    return None


def use_fused(backend: str, x: torch.Tensor) -> bool:
    """Whether a module with this backend runs its fused path on x (raises for an impossible "triton")."""
    if backend == "torch":
        return False
    reason = fused_supported(x)
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run here: {reason}; use backend='auto' or 'torch'")
    return False
