"""``mlla-fast info``: versions, CUDA devices, and the backend that ``backend="auto"`` picks here."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch

from . import __version__
from .backend import ENV_VAR, default_backend, fused_supported


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def auto_backend() -> tuple[str, str]:
    """(backend, why) that ``backend="auto"`` takes for a model on this machine's default training device."""
    probe = torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu")
    reason = fused_supported(probe)
    if reason is None:
        where = "CUDA" if probe.is_cuda else "CPU through the Triton interpreter (TRITON_INTERPRET=1; slow)"
        return "triton", f"fused Triton kernels on {where}"
    return "torch", f"the PyTorch reference ({reason})"


def collect_info() -> dict[str, object]:
    """Versions, devices and backend choice as a dict (what ``mlla-fast info`` prints)."""
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                           f"compute capability {props.major}.{props.minor}")
    backend, why = auto_backend()
    return {
        "mlla-fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda (torch build)": torch.version.cuda or "none (CPU build)",
        "cuda devices": devices or ["none"],
        f"{ENV_VAR}": default_backend(),
        'backend "auto"': f"{backend}: {why}",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mlla-fast info`` takes no flags."""


def run(args: argparse.Namespace) -> int:
    """Print one line per fact (devices one per line)."""
    for key, value in collect_info().items():
        if isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print(f"  {item}")
        else:
            print(f"{key}: {value}")
    return 0
