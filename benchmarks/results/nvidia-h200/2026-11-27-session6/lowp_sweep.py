"""Attention op fwd+bwd (C=64, B=2) per dot precision of the bf16 path, with each kernel's GPU time."""
import dataclasses

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from mlla_fast.kernels import linear_attention as la

DEFAULT = la.CONFIG
variants = [("tf32 (default)", {}), ("lowp-operands", {"lowp_dot_precision": "lowp-operands"})]
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
        per = {e.key: e.self_device_time_total / 5e3 for e in prof.key_averages() if e.key.startswith("_la_")}
        kernels = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per.items()))
        print(f"{side}^2 {name}: fwd+bwd {ms:.3f} ms; {kernels}", flush=True)
la.CONFIG = DEFAULT
