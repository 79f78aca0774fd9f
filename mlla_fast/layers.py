"""Fused versions of the U-Net's parts outside the blocks (stem, EDSM, EUSM, final x4 expand, skip fusion,
LayerNorm).

Each subclasses the reference module (same parameters and state-dict names) and runs its token-major Triton
kernel (for the samplers the op of ``mlla_fast.kernels.sampling`` named ``kernel``) when its backend allows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backend import check_backend, use_fused
from .linear import linear
from .reference import sampling as ref
from .reference.ops import image_to_tokens
from .reference.unet import ConcatLinear as ReferenceConcatLinear


class FusedSampler:
    """Mixin: the backend choice and the fused forward of a ``reference.sampling.TokenSampler``."""

    kernel: str

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if not use_fused(self.backend, x):
            return super().forward(x, hw)
        from .kernels import sampling

        return super().forward(x, hw, op=getattr(sampling, self.kernel))


class Stem(ref.Stem):
    """The convolutional stem on channels-last (NHWC) images where the fused path runs.

    cuDNN's NHWC convolutions are faster for its bf16 activations than their NCHW counterparts, and an NHWC
    activation (B, H, W, C) is a token matrix (B, H*W, C) in memory. So each ConvLayer (conv -> BatchNorm2d ->
    optional ReLU) runs its convolution on cuDNN and its BatchNorm, with the ReLU fused in, on the token
    BatchNorm of kernels/batch_norm.py on a view of the convolution's output (``sampling.image_batch_norm``).
    PyTorch's channels-last BatchNorm kernels took 1.49 ms of the 30.4 ms of GPU time of a U-Net-T training step
    on an H200 (224², batch 48, bf16), besides separate ReLU forward and backward kernels; the fused layers
    about 0.7 ms (session 14). The stem's output tokens (B, H/4 * W/4, C) are a view of its last layer's output
    instead of a transposed copy. A layer with a norm other than nn.BatchNorm2d or an activation other than
    nn.ReLU runs its own forward. Same parameters, buffers and values as the reference.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor) -> Tensor:
        if not use_fused(self.backend, x):
            return super().forward(x)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        # ref.Stem.forward, each layer through _layers.
        x = self._layers(self.conv1, x)
        x = self._layers(self.conv2, x) + x
        return image_to_tokens(self._layers(self.conv3, x))

    @staticmethod
    def _layers(module: nn.Module, x: Tensor) -> Tensor:
        """The reference forward of module (a ConvLayer or a Sequential of them), each plain ConvLayer with a
        BatchNorm2d and a ReLU or no activation on the fused BatchNorm."""
        from .kernels.sampling import image_batch_norm

        for layer in module if isinstance(module, nn.Sequential) else (module,):
            norm, act = getattr(layer, "norm", None), getattr(layer, "act", None)
            if type(layer) is not ref.ConvLayer or type(norm) is not nn.BatchNorm2d or (
                    act is not None and type(act) is not nn.ReLU):
                x = layer(x)
            else:
                x = image_batch_norm(layer.conv(x), norm, relu=act is not None)
        return x


class PatchMerging(FusedSampler, ref.PatchMerging):
    """EDSM on fused kernels: (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C)."""

    kernel = "patch_merging"


class PatchExpand(FusedSampler, ref.PatchExpand):
    """EUSM on fused kernels: (B, H*W, C) -> (B, 4*H*W, C/2)."""

    kernel = "patch_expand"


class FinalPatchExpand_X4(FusedSampler, ref.FinalPatchExpand_X4):
    """Final x4 expand on a fused shuffle + LayerNorm kernel: (B, H*W, C) -> (B, 16*H*W, C)."""

    kernel = "final_expand"


class ConcatLinear(ReferenceConcatLinear):
    """Skip fusion Linear(cat([x, skip])) as two GEMMs on the weight's halves: no concatenated copy."""

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        C = x.shape[-1]
        return linear(x, self.weight[:, :C], self.bias) + linear(skip, self.weight[:, C:])


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm on the Triton LayerNorm (``kernels/layer_norm.py``) where the fused path runs: same
    constructor (plus ``backend``), parameters and state-dict names, and the output dtype ``F.layer_norm`` gives.

    (..., C) -> (..., C). Without weight or bias, or normalising over more than the last dimension, it runs
    nn.LayerNorm; so it does with backend "auto" for more channels than the kernels take.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    @classmethod
    def from_layer_norm(cls, module: nn.LayerNorm, backend: str | None = None) -> LayerNorm:
        """A new LayerNorm with module's shape, eps, parameter values, device and dtype."""
        factory = {} if module.weight is None else {"device": module.weight.device, "dtype": module.weight.dtype}
        new = cls(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                  bias=module.bias is not None, backend=backend, **factory)
        new.load_state_dict(module.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        if (self.weight is None or self.bias is None or len(self.normalized_shape) != 1
                or not use_fused(self.backend, x)):
            return super().forward(x)
        from .kernels.layer_norm import MAX_CHANNELS, layer_norm

        if x.shape[-1] > MAX_CHANNELS and self.backend != "triton":
            return super().forward(x)
        return layer_norm(x if x.stride(-1) == 1 else x.contiguous(), self.weight, self.bias, self.eps)
