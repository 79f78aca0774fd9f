"""Host cost per call (µs, wall, CUDA synchronised once per loop) of a custom op and of one block step at a
host-bound size, with the attention's large-v path (SPLIT_QK_BYTES = 0) and without."""
import time

import torch

import mlla_fast
from mlla_fast import attention
from mlla_fast.kernels.column_sum import column_sum, column_sum_fwd


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


x = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16)
print(f"column_sum (custom op) {per_call_us(lambda: column_sum(x)):.1f} us")
print(f"column_sum_fwd (direct) {per_call_us(lambda: column_sum_fwd(x)):.1f} us")
print(f"torch sum {per_call_us(lambda: x.sum(0, dtype=torch.float32)):.1f} us")
for grid in (64, 512):
    blk = mlla_fast.MLLABlock(64, (grid, grid), 2, backend="triton").cuda()
    xb = torch.randn(2, grid * grid, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(xb)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            y = blk(xb)  # noqa: B023 (called inside the loop iteration that defines it)
        y.backward(g)  # noqa: B023

    default = attention.SPLIT_QK_BYTES
    for split in (default, 0, 1 << 62):
        attention.SPLIT_QK_BYTES = split
        print(f"block {grid}^2 B2 step, SPLIT_QK_BYTES={split}: {per_call_us(step, 100):.0f} us")
    attention.SPLIT_QK_BYTES = default
