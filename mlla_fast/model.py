"""MLLA-UNet on the fused block, and creation of the registered configs by name."""

from __future__ import annotations

import functools

from torch import Tensor

from .backend import check_backend, use_fused
from .block import MLLABlock
from .casts import cast_parameters
from .layers import ConcatLinear, FinalPatchExpand_X4, LayerNorm, PatchExpand, PatchMerging, Stem
from .reference.unet import MODEL_CONFIGS
from .reference.unet import MLLAUNet as ReferenceMLLAUNet

MODEL_NAMES = tuple(f"mlla_unet_{k}" for k in MODEL_CONFIGS)


class MLLAUNet(ReferenceMLLAUNet):
    """MLLA-UNet (SPEC §3) whose blocks take the fused path on CUDA; state dict as released.

    (B, in_chans, H, W) -> (B, num_classes, H, W) logits, H and W multiples of 32.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        self.backend = check_backend(backend)
        parts = {"block_cls": MLLABlock, "downsample_cls": PatchMerging, "upsample_cls": PatchExpand,
                 "final_expand_cls": FinalPatchExpand_X4, "stem_cls": Stem}
        kwargs.update({k: functools.partial(cls, backend=self.backend) for k, cls in parts.items()})
        kwargs["concat_cls"] = ConcatLinear
        super().__init__(*args, **kwargs)
        # The reference builds the bottleneck norm and norm_up as nn.LayerNorm (no constructor hook): the same
        # modules on the Triton LayerNorm, with the same parameters and state-dict names.
        self.norm = LayerNorm.from_layer_norm(self.norm, backend=self.backend)
        self.norm_up = LayerNorm.from_layer_norm(self.norm_up, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        """The reference's forward; on the fused path under autocast, every fp32 parameter is cast to autocast's
        dtype at once on entry (``casts.cast_parameters``), each block's gate and value projections side by side
        so that their GEMM takes them as one weight without a concatenation."""
        if not use_fused(self.backend, x):
            return super().forward(x)
        # a generator: the modules are walked only where the copies are made
        stacked = (p for m in self.modules() if isinstance(m, MLLABlock)
                   for p in (m.act_proj.weight, m.in_proj.weight, m.act_proj.bias, m.in_proj.bias) if p is not None)
        with cast_parameters(self, x, order=stacked):
            return super().forward(x)

    def head(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """The output head; on the fused path one op over chunks of images (``kernels.sampling.final_head``)
        that never holds the full-resolution features for the backward."""
        if not (use_fused(self.backend, x) and self.output.bias is None and self.output.kernel_size == (1, 1)
                and type(self.up) is FinalPatchExpand_X4):
            return super().head(x, hw)
        from .kernels.sampling import final_head

        up = self.up
        return final_head(self.norm_up(x), hw, up.expand.weight, up.norm.weight, up.norm.bias, self.output.weight,
                          up.norm.eps)


def create_model(name: str = "mlla_unet_tiny", num_classes: int = 9, in_chans: int = 3, img_size: int = 224,
                 backend: str | None = None, **kwargs) -> MLLAUNet:
    """Build MLLA-UNet by name: "mlla_unet_tiny" | "mlla_unet_small" | "mlla_unet_base" (or the bare suffix)."""
    key = name.removeprefix("mlla_unet_")
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    return MLLAUNet(**{**MODEL_CONFIGS[key], **kwargs}, num_classes=num_classes, in_chans=in_chans,
                    img_size=img_size, backend=backend)
