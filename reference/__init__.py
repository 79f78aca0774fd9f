"""Pure-PyTorch reference of MLLA-UNet (SPEC.md): the executable specification the kernels are tested against."""

from .block import LinearAttention, MLLABlock, RoPE
from .ops import (
    apply_rope,
    cpe_residual_norm_ref,
    dwconv_silu_ref,
    dwconv_tokens_ref,
    final_expand_ref,
    linear_attention_ref,
    patch_expand_ref,
    patch_merging_ref,
    rope_table,
)
from .sampling import ConvLayer, FinalPatchExpand_X4, PatchExpand, PatchMerging, Stem
from .unet import (
    MODEL_CONFIGS,
    MLLA_UNet,
    MLLAUNet,
    create_reference_model,
    imagenet_to_unet_state_dict,
    load_imagenet_pretrained,
)

__all__ = [
    "MODEL_CONFIGS",
    "ConvLayer",
    "FinalPatchExpand_X4",
    "LinearAttention",
    "MLLABlock",
    "MLLAUNet",
    "MLLA_UNet",
    "PatchExpand",
    "PatchMerging",
    "RoPE",
    "Stem",
    "apply_rope",
    "cpe_residual_norm_ref",
    "create_reference_model",
    "dwconv_silu_ref",
    "dwconv_tokens_ref",
    "final_expand_ref",
    "imagenet_to_unet_state_dict",
    "linear_attention_ref",
    "load_imagenet_pretrained",
    "patch_expand_ref",
    "patch_merging_ref",
    "rope_table",
]
