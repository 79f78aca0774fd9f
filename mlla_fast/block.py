"""The drop-in MLLA block: the released constructor and state-dict names, fused kernels on CUDA."""

from __future__ import annotations

from torch import Tensor, nn

from .backend import check_backend, use_fused
from .reference.block import MLLABlock as ReferenceMLLABlock


class MLLABlock(ReferenceMLLABlock):
    """MLLA block (SPEC §1) with a choice of backend.

    Same constructor, parameters and buffers as the released ``MLLABlock`` (checkpoints load with
    ``strict=True`` both ways), plus ``backend``: "auto" (fused kernels on CUDA, else the
    reference), "triton" (fused kernels or a ``ValueError``) or "torch" (reference); None reads
    ``MLLA_FAST_BACKEND``.

    forward(x, hw=None): x (B, N, C) tokens on the grid hw (default ``input_resolution``).
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, backend: str | None = None, **kwargs):
        super().__init__(dim, input_resolution, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                         drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if use_fused(self.backend, x):
            from .fused import fused_block_forward

            return fused_block_forward(self, x, hw)
        return super().forward(x, hw)
