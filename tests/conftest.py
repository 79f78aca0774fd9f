"""Test set-up: without a CUDA device, Triton kernels run through Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 results are judged against float64 at 1e-5: no TF32 in PyTorch's own GEMMs and convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poison_outputs(monkeypatch):
    """poison_outputs(*modules): every allocation of those kernel modules' ``_empty`` (their outputs and
    partial buffers) starts as NaN, so an element the kernels fail to write shows up in the results."""

    def poison(*modules):
        for module in modules:
            monkeypatch.setattr(module, "_empty", _nan_empty)

    return poison
