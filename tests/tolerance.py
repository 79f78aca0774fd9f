"""Error measures and the project's tolerance rule (DESIGN.md, "Correctness rules").

fp32 against a float64 reference: relative error <= 1e-5. Low precision: the kernel's error
against the float64 reference is at most twice the error that PyTorch's own computation of the
reference in that precision makes, plus a small floor.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5
LOWP_FACTOR = 2.0
LOWP_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere gives inf."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def assert_matches(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> None:
    """Assert out agrees with the float64 reference ref64 under the rule for dtype.

    For bf16/fp16, ref_lowp is the reference computed by PyTorch in that dtype.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = rel_err(out, ref64)
    if dtype in (torch.float32, torch.float64):
        bound = FP32_RTOL
    else:
        assert ref_lowp is not None, f"{name}: low-precision check needs PyTorch's own {dtype} result"
        bound = LOWP_FACTOR * rel_err(ref_lowp, ref64) + LOWP_FLOOR[dtype]
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e} ({dtype})"
