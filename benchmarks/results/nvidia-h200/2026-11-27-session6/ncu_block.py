"""Three fwd+bwd steps of one MLLA block (C=64, B=2, bf16 autocast) at the given grid side, for ncu."""
import sys

import torch

import mlla_fast

side = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
block = mlla_fast.MLLABlock(64, (side, side), 2, backend="triton").cuda().train()
x = torch.randn(2, side * side, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for _ in range(3):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
    y.float().square().mean().backward()
torch.cuda.synchronize()
