"""Reference MLLA-UNet (SPEC §3): encoder of MLLA stages with EDSM, mirrored decoder with EUSM."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import MLLABlock
from .ops import trunc_normal_init
from .sampling import FinalPatchExpand_X4, PatchExpand, PatchMerging, Stem

MODEL_CONFIGS: dict[str, dict] = {
    "tiny": dict(embed_dim=64, depths=(2, 4, 8, 4), depths_decoder=(1, 2, 2, 2), num_heads=(2, 4, 8, 16)),
    "small": dict(embed_dim=64, depths=(3, 6, 21, 6), depths_decoder=(1, 2, 2, 2), num_heads=(2, 4, 8, 16)),
    "base": dict(embed_dim=96, depths=(3, 6, 21, 6), depths_decoder=(1, 2, 2, 2), num_heads=(3, 6, 12, 24)),
}


class ConcatLinear(nn.Linear):
    """``concat_back_dim``: Linear(2C -> C) applied to cat([decoder, skip], -1) (decoder features first)."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return F.linear(torch.cat([x, skip], dim=-1), self.weight, self.bias)


class BasicLayer(nn.Module):
    """An encoder stage: MLLA blocks, then an optional EDSM downsample (``resample_cls``)."""

    resample_name = "downsample"  # the released state-dict name of the stage's sampler

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, mlp_ratio: float,
        qkv_bias: bool, drop: float, drop_path: Sequence[float], block_cls: Callable,
        resample_cls: Callable | None,
    ):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(
            block_cls(dim, input_resolution, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                      drop_path=drop_path[j])
            for j in range(depth)
        )
        setattr(self, self.resample_name, resample_cls(input_resolution, dim) if resample_cls else None)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        for blk in self.blocks:
            x = blk(x, hw)
        resample = getattr(self, self.resample_name)
        return x if resample is None else resample(x, hw)


class BasicLayerUp(BasicLayer):
    """A decoder stage: MLLA blocks, then an optional EUSM upsample (``resample_cls``)."""

    resample_name = "upsample"


class MLLAUNet(nn.Module):
    """MLLA-UNet: (B, in_chans, H, W) image -> (B, num_classes, H, W) logits; H, W multiples of 32.

    ``img_size`` fixes only the grids the RoPE buffers are stored for (the released checkpoints'
    contract); any input whose sides are multiples of 32 runs. A 1-channel image is repeated to
    3 channels when the model expects 3, as the released wrapper does. The ``*_cls`` arguments
    inject the parts (the fast package passes its fused versions); a decoder stage's blocks take
    the drop-path rates of the mirrored encoder stage, the last one repeated if it has more blocks.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 9,
        embed_dim: int = 64,
        depths: Sequence[int] = (2, 4, 8, 4),
        depths_decoder: Sequence[int] = (1, 2, 2, 2),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        block_cls: Callable = MLLABlock,
        downsample_cls: Callable = PatchMerging,
        upsample_cls: Callable = PatchExpand,
        final_expand_cls: Callable = FinalPatchExpand_X4,
        concat_cls: Callable = ConcatLinear,
        stem_cls: Callable = Stem,
        **kwargs,
    ):
        super().__init__()
        if patch_size != 4:
            raise ValueError(f"the MLLA stem has stride 4; patch_size must be 4, got {patch_size}")
        if not (len(depths) == len(depths_decoder) == len(num_heads)):
            raise ValueError("depths, depths_decoder and num_heads must have one entry per stage")
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}")
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_layers = n = len(depths)
        self.size_multiple = patch_size * 2 ** (n - 1)
        for side in img_hw:
            if side % self.size_multiple:
                raise ValueError(f"img_size sides must be multiples of {self.size_multiple}, got {img_hw}")
        self.img_size = img_hw
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_features = embed_dim * 2 ** (n - 1)

        self.patch_embed = stem_cls(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(n + 1)]
        grids = self.stage_grids(img_hw)

        self.layers = nn.ModuleList(
            BasicLayer(embed_dim * 2**i, grids[i], depths[i], num_heads[i], mlp_ratio, qkv_bias, drop_rate,
                       dpr[starts[i]:starts[i + 1]], block_cls, downsample_cls if i < n - 1 else None)
            for i in range(n)
        )
        self.norm = nn.LayerNorm(self.num_features)

        self.layers_up = nn.ModuleList()
        self.concat_back_dim = nn.ModuleList()
        for i in range(n):
            s = n - 1 - i
            dim = embed_dim * 2**s
            self.concat_back_dim.append(concat_cls(2 * dim, dim) if i > 0 else nn.Identity())
            if i == 0:
                self.layers_up.append(upsample_cls(grids[s], dim))
            else:
                mirrored = dpr[starts[s]:starts[s + 1]]
                decoder_dpr = [mirrored[min(j, len(mirrored) - 1)] for j in range(depths_decoder[i])]
                self.layers_up.append(
                    BasicLayerUp(dim, grids[s], depths_decoder[i], num_heads[s], mlp_ratio, qkv_bias, drop_rate,
                                 decoder_dpr, block_cls, upsample_cls if i < n - 1 else None)
                )
        self.norm_up = nn.LayerNorm(embed_dim)
        self.up = final_expand_cls(grids[0], embed_dim)
        self.output = nn.Conv2d(embed_dim, num_classes, 1, bias=False)
        self.apply(trunc_normal_init)

    def stage_grids(self, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid of each stage for an input image of size image_hw."""
        H, W = image_hw[0] // 4, image_hw[1] // 4
        return [(H >> i, W >> i) for i in range(self.num_layers)]

    def check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected a 4-D image batch (B, {self.in_chans}, H, W), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point image, got dtype {x.dtype}")
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            else:
                raise ValueError(f"expected {self.in_chans} (or 1) input channels, got {x.shape[1]}")
        H, W = x.shape[-2:]
        if H % self.size_multiple or W % self.size_multiple or H == 0 or W == 0:
            raise ValueError(f"image sides must be positive multiples of {self.size_multiple}, got {H}x{W}")
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        grids = self.stage_grids(tuple(x.shape[-2:]))
        x = self.pos_drop(self.patch_embed(x))
        skips = []
        for i, layer in enumerate(self.layers):
            skips.append(x)
            x = layer(x, grids[i])
        x = self.norm(x)
        n = self.num_layers
        for i, layer_up in enumerate(self.layers_up):
            s = n - 1 - i
            if i == 0:
                x = layer_up(x, grids[s])
            else:
                x = layer_up(self.concat_back_dim[i](x, skips[s]), grids[s])
        return self.head(x, grids[0])

    def head(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """norm_up, the final x4 expand and the 1x1 output convolution: (B, h*w, C) tokens on the grid hw ->
        (B, num_classes, 4h, 4w) logits."""
        x = self.up(self.norm_up(x), hw)
        x = x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, 4 * hw[0], 4 * hw[1])
        return self.output(x)


MLLA_UNet = MLLAUNet


def imagenet_to_unet_state_dict(checkpoint: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map an ImageNet MLLA classifier's state dict onto MLLA-UNet (SPEC §3, ImageNet initialisation).

    Encoder, stem and ``norm`` load directly; encoder stage i's blocks are also copied into decoder
    stage ``layers_up.(3-i)``; ``head.*`` and every entry whose name or shape has no match in the
    model (RoPE tables of another grid, decoder sampling layers) are dropped.
    """
    target = model.state_dict()
    n = len(model.layers) if hasattr(model, "layers") else 4
    mapped: dict[str, Tensor] = {}
    for key, value in checkpoint.items():
        if key.startswith("head."):
            continue
        mapped[key] = value
        if key.startswith("layers."):
            stage, rest = key[len("layers."):].split(".", 1)
            mapped[f"layers_up.{n - 1 - int(stage)}.{rest}"] = value
    return {k: v for k, v in mapped.items() if k in target and target[k].shape == v.shape}


def load_imagenet_pretrained(model: nn.Module, checkpoint: str | Mapping) -> tuple[list[str], list[str]]:
    """Load an ImageNet MLLA checkpoint (a path, or a dict with a ``model`` key) into MLLA-UNet.

    Returns (loaded keys, model keys left at their initialisation).
    """
    if isinstance(checkpoint, str):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "model" not in checkpoint:
        raise ValueError(f"expected an MLLA ImageNet checkpoint with a 'model' key, got keys {list(checkpoint)[:8]}")
    state = imagenet_to_unet_state_dict(checkpoint["model"], model)
    if not any(k.startswith("layers.") for k in state):
        raise ValueError("the checkpoint's 'model' dict matched no encoder weights of this MLLA-UNet")
    result = model.load_state_dict(state, strict=False)
    return sorted(state), sorted(result.missing_keys)


def create_reference_model(name: str = "tiny", **kwargs) -> MLLAUNet:
    """Build a reference MLLA-UNet by config name ("tiny", "small", "base"; "mlla_unet_" prefix ok)."""
    key = name.removeprefix("mlla_unet_")
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown MLLA-UNet config {name!r}; expected one of {sorted(MODEL_CONFIGS)}")
    return MLLAUNet(**{**MODEL_CONFIGS[key], **kwargs})
