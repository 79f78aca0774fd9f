"""mlla-fast: MLLA-UNet with fused Triton kernels, and a pure-PyTorch reference.

Importing this package needs neither a GPU nor Triton: the fused kernels load on first use.
"""

from .backend import BACKENDS, ENV_VAR
from .block import MLLABlock
from .model import MODEL_NAMES, MLLAUNet, create_model
from .reference.unet import MODEL_CONFIGS, load_imagenet_pretrained

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "MODEL_CONFIGS",
    "MODEL_NAMES",
    "MLLABlock",
    "MLLAUNet",
    "create_model",
    "load_imagenet_pretrained",
]
