"""GPU time of the forward stencil kernels (cpe + norm, dwconv + SiLU, transposed stencils) per launch setting:
one block C=64 2x1024² bf16 fwd+bwd, and a U-Net-T training step at 224², batch 48, bf16."""
import itertools
import sys

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

import mlla_fast
from mlla_fast.kernels import dwconv

STENCIL = ("_stencil_walk_kernel", "_cpe_residual_norm_fwd_kernel", "_dwconv_silu_fwd_kernel",
           "_dwconv_transpose_kernel")


def gpu_times(step, n=3):
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in ev) / (n * 1e3)
    stencil = sum(e.self_device_time_total for e in ev if e.key in STENCIL) / (n * 1e3)
    return total, stencil


block = mlla_fast.MLLABlock(64, (1024, 1024), 2, backend="triton").cuda().train()
xb = torch.randn(2, 1024 * 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
model = mlla_fast.create_model("mlla_unet_tiny", num_classes=9, img_size=224, backend="triton").cuda().train()
xm = torch.randn(48, 3, 224, 224, device="cuda")
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)


def block_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(xb)
    y.float().square().mean().backward()


def unet_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(xm)
    out.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


if hasattr(dwconv, "STENCIL_FWD_TILE_ELEMENTS") and "--sweep" in sys.argv:
    settings = list(itertools.product((512, 1024, 2048), (4, 8, 16)))
else:
    settings = [(getattr(dwconv, "STENCIL_FWD_TILE_ELEMENTS", None),
                 getattr(dwconv, "STENCIL_FWD_PROGRAMS_PER_SM", None))]
for tile, per_sm in settings:
    if tile is not None:
        dwconv.STENCIL_FWD_TILE_ELEMENTS, dwconv.STENCIL_FWD_PROGRAMS_PER_SM = tile, per_sm
    bt, bs = gpu_times(block_step)
    ms = triton.testing.do_bench(block_step, warmup=5, rep=50, grad_to_none=[xb])
    ut, us = gpu_times(unet_step)
    print(f"tile {tile} programs/SM {per_sm}: block 1024² fwd+bwd {ms:.2f} ms (GPU {bt:.2f}, stencils {bs:.3f}); "
          f"U-Net-T step GPU {ut:.2f} ms, stencils {us:.3f}", flush=True)
