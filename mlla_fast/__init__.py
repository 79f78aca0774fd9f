"""mlla-fast: MLLA-UNet with fused Triton kernels, and a pure-PyTorch reference."""

__version__ = "0.1.0"
