"""Reference MLLA block (SPEC §1-2): the released module names and state-dict keys, plain PyTorch."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .ops import (
    check_tokens,
    cpe_residual_norm_ref,
    drop_path,
    dwconv_silu_ref,
    linear_attention_ref,
    rope_table,
)

HEAD_DIM_MULTIPLE = 32


def depthwise3x3(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)


def check_block_args(dim: int, num_heads: int) -> None:
    if dim % HEAD_DIM_MULTIPLE:
        raise ValueError(f"MLLA channel count must be a multiple of {HEAD_DIM_MULTIPLE}, got {dim}")
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads must divide the channel count {dim}, got {num_heads}")


def resolve_grid(x: Tensor, hw: tuple[int, int] | None, default: tuple[int, int], dim: int) -> tuple[int, int]:
    """The grid a block runs on: hw if given, else the constructor's input_resolution; checks x."""
    grid = tuple(int(s) for s in (default if hw is None else hw))
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be two positive integers (H, W), got {hw}")
    check_tokens(x, grid, dim)
    return grid


class RoPE(nn.Module):
    """2-D rotary position encoding (SPEC §2.3) with the released `rotations` buffer.

    The buffer holds the table for the constructor's grid, so released checkpoints load with
    ``strict=True``; any other grid gets its table computed by the same formula.
    """

    def __init__(self, shape: tuple[int, int, int], base: float = 10000.0):
        super().__init__()
        H, W, C = shape
        self.register_buffer("rotations", rope_table(H, W, C))

    def table(self, H: int, W: int) -> Tensor:
        if tuple(self.rotations.shape[:2]) == (H, W):
            return self.rotations
        return rope_table(
            H, W, 2 * self.rotations.shape[2], device=self.rotations.device, dtype=self.rotations.dtype
        )


class LinearAttention(nn.Module):
    """MLLA linear attention with LePE (SPEC §2); v is its own input (no value projection)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, qkv_bias: bool = True):
        super().__init__()
        check_block_args(dim, num_heads)
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.elu = nn.ELU()
        self.lepe = depthwise3x3(dim)
        self.rope = RoPE((self.input_resolution[0], self.input_resolution[1], dim))

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, gate: Tensor | None = None) -> Tensor:
        """x (B, N, C) -> attention(x) + lepe(x), multiplied by gate (B, N, C) when given."""
        H, W = resolve_grid(x, hw, self.input_resolution, self.dim)
        return linear_attention_ref(
            self.qk(x), x, gate, self.lepe.weight, self.lepe.bias, (H, W), self.num_heads,
            rotations=self.rope.table(H, W),
        )


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MLLABlock(nn.Module):
    """Mamba-like linear attention block (SPEC §1), the released constructor and parameter names.

    forward(x, hw=None): x (B, N, C) tokens on the grid hw (default ``input_resolution``) -> (B, N, C).
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer=nn.GELU,
        norm_layer=nn.LayerNorm,
        **kwargs,
    ):
        super().__init__()
        check_block_args(dim, num_heads)
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.drop_path_prob = float(drop_path)

        self.cpe1 = depthwise3x3(dim)
        self.norm1 = norm_layer(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = depthwise3x3(dim)
        self.act = nn.SiLU()
        self.attn = LinearAttention(dim, self.input_resolution, num_heads, qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.cpe2 = depthwise3x3(dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        hw = resolve_grid(x, hw, self.input_resolution, self.dim)
        x, h = cpe_residual_norm_ref(
            x, self.cpe1.weight, self.cpe1.bias, self.norm1.weight, self.norm1.bias, hw, self.norm1.eps
        )
        gate = F.silu(self.act_proj(h))
        v = dwconv_silu_ref(self.in_proj(h), self.dwc.weight, self.dwc.bias, hw)
        a = self.attn(v, hw, gate=gate)
        x = x + drop_path(self.out_proj(a), self.drop_path_prob, self.training)
        x, h = cpe_residual_norm_ref(
            x, self.cpe2.weight, self.cpe2.bias, self.norm2.weight, self.norm2.bias, hw, self.norm2.eps
        )
        return x + drop_path(self.mlp(h), self.drop_path_prob, self.training)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
            f"mlp_ratio={self.mlp_ratio}, drop_path={self.drop_path_prob}"
        )

