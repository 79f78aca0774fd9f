"""The Triton MLP (kernels/mlp.py) on a GPU: fwd and fwd+bwd (bf16 autocast, residual) per shape, then (--sweep)
per launch setting of each kernel. Medians of triton.testing.do_bench."""
import sys

import torch
import triton.testing

from mlla_fast.kernels import mlp as kmlp
from mlla_fast.mlp import triton_mlp
from mlla_fast.reference.block import Mlp

SHAPES = [(2 * 512 * 512, 64), (2 * 1024 * 1024, 64), (48 * 56 * 56, 64), (48 * 28 * 28, 128)]


def timeit(M, C):
    torch.manual_seed(0)
    mod = Mlp(C, 4 * C).cuda()
    x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return triton_mlp(mod, x, residual=res)

    def step():
        torch.autograd.backward(fwd(), dy)

    f = triton.testing.do_bench(lambda: fwd(), warmup=10, rep=100)
    b = triton.testing.do_bench(step, warmup=10, rep=150, grad_to_none=[x, *mod.parameters()])
    return f, b


for M, C in SHAPES:
    f, b = timeit(M, C)
    print(f"M={M} C={C}: fwd {f:.4f} ms, fwd+bwd {b:.4f} ms", flush=True)

if "--sweep" in sys.argv:
    defaults = {k: getattr(kmlp, k) for k in ("FWD_BLOCK_M", "FWD_BLOCK_H", "DX_BLOCK_M", "DX_BLOCK_H", "DW_BLOCK_M",
                                              "DW_BLOCK_H")}
    variants = [("FWD", 128, 32), ("FWD", 128, 64), ("FWD", 64, 64), ("DX", 128, 32), ("DX", 64, 64),
                ("DW", 64, 32), ("DW", 32, 64), ("DW", 128, 32), ("DW", 32, 32)]
    for M, C in (SHAPES[0], SHAPES[2], SHAPES[3]):
        for kern, bm, bh in variants:
            for k, v in defaults.items():
                setattr(kmlp, k, v)
            setattr(kmlp, f"{kern}_BLOCK_M", bm)
            setattr(kmlp, f"{kern}_BLOCK_H", bh)
            try:
                f, b = timeit(M, C)
                print(f"M={M} C={C} {kern} BLOCK_M={bm} BLOCK_H={bh}: fwd {f:.4f} ms, fwd+bwd {b:.4f} ms", flush=True)
            except Exception as exc:
                print(f"M={M} C={C} {kern} BLOCK_M={bm} BLOCK_H={bh}: failed {type(exc).__name__}: {str(exc)[:100]}")
    for k, v in defaults.items():
        setattr(kmlp, k, v)
