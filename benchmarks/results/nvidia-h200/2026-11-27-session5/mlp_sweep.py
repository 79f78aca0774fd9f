"""MLP fwd+bwd on an H100/H200: the Triton MLP per launch setting against the chunked cuBLAS MLP, bf16 autocast."""
import itertools

import torch
import triton.testing

from mlla_fast.kernels import mlp as kmlp
from mlla_fast.mlp import chunked_mlp, triton_mlp
from mlla_fast.reference.block import Mlp

DEFAULTS = {k: getattr(kmlp, k) for k in ("FWD_BLOCK_M", "FWD_BLOCK_H", "DX_BLOCK_M", "DX_BLOCK_H", "DW_BLOCK_M",
                                          "DW_BLOCK_H", "DW_PROGRAMS_PER_SM")}
DEFAULT_WARPS = dict(kmlp.WARPS_BY_CHANNELS)


def timeit(fn, M, C):
    mod = Mlp(C, 4 * C).cuda()
    x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(mod, x, res)
        torch.autograd.backward(y, dy)
    fwd = triton.testing.do_bench(lambda: fn(mod, x.detach(), res), warmup=5, rep=40)
    both = triton.testing.do_bench(step, warmup=5, rep=60, grad_to_none=[x, *mod.parameters()])
    return fwd, both


def run_triton(mod, x, res):
    return triton_mlp(mod, x, residual=res)


def run_chunked(mod, x, res):
    return res + chunked_mlp(mod, x)


def chunked_autocast(mod, x, res):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return res + chunked_mlp(mod, x)


SHAPES = [(2 * 1024 * 1024, 64), (2 * 512 * 512, 64), (48 * 56 * 56, 64), (48 * 28 * 28, 128)]
for M, C in SHAPES:
    for name, fn in (("chunked cuBLAS", chunked_autocast), ("triton default", run_triton)):
        f, b = timeit(fn, M, C)
        print(f"M={M} C={C} {name}: fwd {f:.3f} ms, fwd+bwd {b:.3f} ms", flush=True)

grid = {
    "FWD": list(itertools.product((64, 128), (32, 64), (4, 8))),
    "DX": list(itertools.product((64, 128), (32, 64), (4, 8))),
    "DW": list(itertools.product((32, 64, 128), (32, 64), (4, 8))),
}
for M, C in (SHAPES[0], SHAPES[3]):
    for kern, configs in grid.items():
        for bm, bh, w in configs:
            for k, v in DEFAULTS.items():
                setattr(kmlp, k, v)
            setattr(kmlp, f"{kern}_BLOCK_M", bm)
            setattr(kmlp, f"{kern}_BLOCK_H", bh)
            kmlp.WARPS_BY_CHANNELS = {**DEFAULT_WARPS, max(32, C): w}
            try:
                f, b = timeit(run_triton, M, C)
                print(f"M={M} C={C} {kern} BM={bm} BH={bh} warps={w}: fwd {f:.3f} fwd+bwd {b:.3f} ms", flush=True)
            except Exception as e:
                print(f"M={M} C={C} {kern} BM={bm} BH={bh} warps={w}: failed {type(e).__name__}: {str(e)[:120]}")
    for k, v in DEFAULTS.items():
        setattr(kmlp, k, v)
    kmlp.WARPS_BY_CHANNELS = dict(DEFAULT_WARPS)
    for per_sm in (1, 2, 4, 8):
        kmlp.DW_PROGRAMS_PER_SM = per_sm
        f, b = timeit(run_triton, M, C)
        print(f"M={M} C={C} DW programs/SM={per_sm}: fwd+bwd {b:.3f} ms", flush=True)
    kmlp.DW_PROGRAMS_PER_SM = DEFAULTS["DW_PROGRAMS_PER_SM"]
