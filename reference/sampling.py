"""Reference stem, EDSM (PatchMerging), EUSM (PatchExpand) and the final x4 expand (SPEC §3)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .ops import check_tokens, final_expand_ref, image_to_tokens, patch_expand_ref, patch_merging_ref


class ConvLayer(nn.Module):
    """conv -> optional BatchNorm -> optional activation, with the released key names."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        norm=nn.BatchNorm2d,
        act_func=nn.ReLU,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias
        )
        self.norm = norm(out_channels) if norm else None
        self.act = act_func() if act_func else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Stem(nn.Module):
    """Convolutional stem of total stride 4: (B, in_chans, H, W) -> tokens (B, H/4 * W/4, embed_dim)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 64):
        super().__init__()
        half = embed_dim // 2
        self.conv1 = ConvLayer(in_chans, half, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Sequential(
            ConvLayer(half, half, 3, padding=1, bias=False),
            ConvLayer(half, half, 3, padding=1, bias=False, act_func=None),
        )
        self.conv3 = nn.Sequential(
            ConvLayer(half, embed_dim * 4, 3, stride=2, padding=1, bias=False),
            ConvLayer(embed_dim * 4, embed_dim, 1, bias=False, act_func=None),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.conv2(x) + x
        return image_to_tokens(self.conv3(x))


class TokenSampler(nn.Module):
    """Shared forward of the token-grid samplers: check the tokens against the grid, then run ``op`` (the
    reference op; the fused package passes its kernel) on ``op_args()``, the arguments after (x, hw)."""

    input_resolution: tuple[int, int]
    dim: int
    reference_op: Callable[..., Tensor]
    op_args: Callable[[], tuple]

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None, op=None) -> Tensor:
        hw = tuple(self.input_resolution if hw is None else hw)
        check_tokens(x, hw, self.dim)
        return (op or self.reference_op)(x, hw, *self.op_args())


class PatchMerging(TokenSampler):
    """EDSM: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C) through 1x1 expand, stride-2 DW conv, 1x1 reduce."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, ratio: float = 4.0):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=None),
            ConvLayer(hidden, hidden, 3, stride=2, padding=1, groups=hidden, norm=None),
            ConvLayer(hidden, 2 * dim, 1, act_func=None),
        )

    reference_op = staticmethod(patch_merging_ref)

    def op_args(self) -> tuple:
        c0, c1, c2 = self.conv
        return c0.conv.weight, c0.conv.bias, c1.conv.weight, c1.conv.bias, c2.conv.weight, c2.conv.bias, c2.norm


class PatchExpand(TokenSampler):
    """EUSM: (B, H*W, C) -> (B, 4*H*W, C/2) through 1x1 expand, DW transposed conv, 1x1 reduce, LayerNorm."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, dim_scale: int = 2, norm_layer=nn.LayerNorm):
        super().__init__()
        if dim_scale != 2:
            raise ValueError(f"PatchExpand upsamples by 2, got dim_scale={dim_scale}")
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        hidden = 4 * dim
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=None),
            nn.ConvTranspose2d(hidden, hidden, 3, stride=2, padding=1, output_padding=1, groups=hidden, bias=False),
            ConvLayer(hidden, dim // 2, 1, act_func=None),
        )
        self.norm = norm_layer(dim // 2)

    reference_op = staticmethod(patch_expand_ref)

    def op_args(self) -> tuple:
        c0, c1, c2 = self.conv
        return (c0.conv.weight, c0.conv.bias, c1.weight, c2.conv.weight, c2.conv.bias, c2.norm, self.norm.weight,
                self.norm.bias, self.norm.eps)


class FinalPatchExpand_X4(TokenSampler):
    """Final x4 expand: (B, H*W, C) -> (B, 16*H*W, C) on the (4H, 4W) grid, then LayerNorm."""

    def __init__(self, input_resolution: tuple[int, int], dim: int, dim_scale: int = 4, norm_layer=nn.LayerNorm):
        super().__init__()
        if dim_scale != 4:
            raise ValueError(f"FinalPatchExpand_X4 upsamples by 4, got dim_scale={dim_scale}")
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.norm = norm_layer(dim)

    reference_op = staticmethod(final_expand_ref)

    def op_args(self) -> tuple:
        return self.expand.weight, self.norm.weight, self.norm.bias, self.norm.eps
