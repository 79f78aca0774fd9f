"""Fused versions of the U-Net's sampling parts (EDSM, EUSM, final x4 expand, skip fusion).

Each subclasses the reference module (same parameters and state-dict names) and runs the
token-major Triton kernels of ``mlla_fast.kernels.sampling`` when its backend allows.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backend import check_backend, use_fused
from .reference import sampling as ref
from .reference.ops import check_tokens
from .reference.unet import ConcatLinear as ReferenceConcatLinear


class PatchMerging(ref.PatchMerging):
    """EDSM on fused kernels: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, ratio: float = 4.0, backend: str | None = None):
        super().__init__(input_resolution, dim, ratio)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if not use_fused(self.backend, x):
            return super().forward(x, hw)
        from .kernels.sampling import patch_merging

        hw = tuple(self.input_resolution if hw is None else hw)
        check_tokens(x, hw, self.dim)
        c0, c1, c2 = self.conv
        return patch_merging(
            x, hw, c0.conv.weight, c0.conv.bias, c1.conv.weight, c1.conv.bias, c2.conv.weight, c2.conv.bias,
            c2.norm,
        )


class PatchExpand(ref.PatchExpand):
    """EUSM on fused kernels: (B, H*W, C) -> (B, 4*H*W, C/2)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, dim_scale: int = 2, norm_layer=nn.LayerNorm,
                 backend: str | None = None):
        super().__init__(input_resolution, dim, dim_scale, norm_layer)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if not use_fused(self.backend, x):
            return super().forward(x, hw)
        from .kernels.sampling import patch_expand

        hw = tuple(self.input_resolution if hw is None else hw)
        check_tokens(x, hw, self.dim)
        c0, c1, c2 = self.conv
        return patch_expand(
            x, hw, c0.conv.weight, c0.conv.bias, c1.weight, c2.conv.weight, c2.conv.bias, c2.norm,
            self.norm.weight, self.norm.bias, self.norm.eps,
        )


class FinalPatchExpand_X4(ref.FinalPatchExpand_X4):
    """Final x4 expand on a fused shuffle + LayerNorm kernel: (B, H*W, C) -> (B, 16*H*W, C)."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, dim_scale: int = 4, norm_layer=nn.LayerNorm,
                 backend: str | None = None):
        super().__init__(input_resolution, dim, dim_scale, norm_layer)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if not use_fused(self.backend, x):
            return super().forward(x, hw)
        from .kernels.sampling import final_expand

        hw = tuple(self.input_resolution if hw is None else hw)
        check_tokens(x, hw, self.dim)
        return final_expand(x, hw, self.expand.weight, self.norm.weight, self.norm.bias, self.norm.eps)


class ConcatLinear(ReferenceConcatLinear):
    """Skip fusion Linear(cat([x, skip])) as two GEMMs on the weight's halves: no concatenated copy."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        C = x.shape[-1]
        return F.linear(x, self.weight[:, :C], self.bias) + F.linear(skip, self.weight[:, C:])
