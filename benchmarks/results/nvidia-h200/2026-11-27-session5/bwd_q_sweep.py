"""Attention op fwd+bwd (C=64, B=2, bf16) and the q-side backward kernel's GPU time per bwd_q launch setting."""
import dataclasses
import sys

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from mlla_fast.kernels import linear_attention as la

DEFAULT = la.CONFIG
variants = [("default", {})]
if "--variants" in sys.argv:
    variants += [("bwd_q_block_n=32", {"bwd_q_block_n": 32}), ("bwd_q_warps=8", {"bwd_q_warps": 8}),
                 ("bwd_q_block_n=32 warps=2", {"bwd_q_block_n": 32, "bwd_q_warps": 2})]
for side in (512, 1024):
    B, C, N = 2, 64, side * side
    qk = torch.randn(B, N, 2 * C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(C, 1, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(C, device="cuda", requires_grad=True)
    dy = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16)

    def step(qk=qk, v=v, g=g, w=w, b=b, dy=dy, side=side, C=C):
        y = la.linear_attention(qk, v, g, w, b, (side, side), C // 32, gate_silu=True)
        torch.autograd.backward(y, dy)
    for name, change in variants:
        la.CONFIG = dataclasses.replace(DEFAULT, **change)
        step()
        ms = triton.testing.do_bench(step, warmup=10, rep=100, grad_to_none=[qk, v, g, w, b])
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        bwd_q = sum(e.self_device_time_total for e in prof.key_averages() if "_la_bwd_q_kernel" in e.key) / 5e3
        print(f"{side}^2 {name}: fwd+bwd {ms:.3f} ms, _la_bwd_q_kernel {bwd_q:.3f} ms", flush=True)
la.CONFIG = DEFAULT
