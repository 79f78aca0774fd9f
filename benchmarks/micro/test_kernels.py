"""Micro benchmarks (pytest-benchmark) of each fused kernel against its reference op, on CUDA.

    pytest benchmarks/micro --benchmark-json=micro.json            # everything (a few minutes)
    pytest benchmarks/micro -k "bf16 and fwd+bwd"                   # a quick subset

Each benchmark group (``<op> <mode> <dtype> <grid>``) holds the fused kernel and its reference with the
same arguments. Inputs are fresh random tensors for every round, made outside the timed region; a
round ends with ``torch.cuda.synchronize()``. bf16 means autocast to bf16 with bf16 activations and
fp32 parameters, as in the model. Before a fused kernel is timed, its forward output is compared
with the reference (fp32 without TF32: relative error <= 1e-4; bf16: the sanity bound of
``benchmarks.common``); a kernel that computes something else fails instead of reporting a time.
Skipped without CUDA, without pytest-benchmark, or when the kernel is not importable. Not part of
the CI test path (``tests/``).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `benchmarks.common`

from benchmarks.common import (
    DTYPES,
    FP32_CHECK_RTOL,
    autocast,
    environment,
    lowp_bound,
    no_tf32,
    relative_error,
)
from mlla_fast.reference import (
    FinalPatchExpand_X4,
    PatchExpand,
    PatchMerging,
    cpe_residual_norm_ref,
    dwconv_silu_ref,
    final_expand_ref,
    linear_attention_ref,
    patch_expand_ref,
    patch_merging_ref,
    rope_table,
)

BATCH, DIM, HEADS = 2, 64, 2
BLOCK_GRIDS = (56, 256, 1024)  # stage-0 grids of 224² and 1024² images, and a scaling-benchmark grid
SAMPLING_GRIDS = (56, 256)
IMPLS = ("fused", "reference")
MODES = ("fwd", "fwd+bwd")
ROUNDS, WARMUP_ROUNDS = 20, 3

Make = Callable[[torch.dtype, bool], tuple[tuple, dict[str, Any]]]


def grid_id(grid: int) -> str:
    return f"{grid}x{grid}"


def cases(grids: tuple[int, ...]) -> Callable:
    """Parametrize over implementation, mode, dtype and grid."""
    def decorate(fn: Callable) -> Callable:
        for name, values, ids in (("grid", grids, grid_id), ("dtype", tuple(DTYPES), None), ("mode", MODES, None),
                                  ("impl", IMPLS, None)):
            fn = pytest.mark.parametrize(name, values, ids=ids)(fn)
        return fn
    return decorate


@pytest.fixture(scope="session")
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("the kernel micro benchmarks time CUDA kernels: no CUDA device here")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def env_record(device: torch.device) -> dict[str, Any]:
    return environment(device)


def load_kernel(module: str, name: str) -> Callable:
    """mlla_fast.kernels.<module>.<name>, or a skip that says why it is not there."""
    try:
        return getattr(importlib.import_module(f"mlla_fast.kernels.{module}"), name)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"mlla_fast.kernels.{module}.{name} is not importable: {type(exc).__name__}: {exc}")


def activation(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool, device: torch.device) -> Tensor:
    """Fresh standard-normal values drawn in fp32 (so every dtype sees the same values for one seed)."""
    return torch.randn(shape, device=device).to(dtype).requires_grad_(requires_grad)


def outputs(result: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def check_fused(fused: Callable, reference: Callable, make: Make, dtype: torch.dtype, device: torch.device) -> None:
    """Fail unless the fused forward agrees with the reference (see the module docstring)."""
    def run(fn: Callable, dt: torch.dtype) -> tuple[Tensor, ...]:
        torch.manual_seed(1234)
        args, kwargs = make(dt, False)
        with torch.no_grad(), autocast(device, dt):
            return tuple(o.float() for o in outputs(fn(*args, **kwargs)))

    with no_tf32():
        ref32 = run(reference, torch.float32)
        got = run(fused, dtype)
        own = run(reference, dtype) if dtype != torch.float32 else None
    for i, (g, r) in enumerate(zip(got, ref32, strict=True)):
        bound = FP32_CHECK_RTOL if own is None else lowp_bound(relative_error(own[i], r))
        err = relative_error(g, r)
        assert err <= bound, f"fused output {i}: relative error {err:.2e} > {bound:.2e}; not timing a wrong kernel"


@pytest.fixture
def bench(request: pytest.FixtureRequest, device: torch.device, env_record: dict[str, Any]) -> Callable:
    """bench(fused, reference, make, params, impl, mode, dtype, group): time one implementation."""
    if not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("the micro benchmarks need pytest-benchmark (pip install pytest-benchmark)")
    benchmark = request.getfixturevalue("benchmark")

    def run(fused: Callable, reference: Callable, make: Make, params: list[nn.Parameter], impl: str, mode: str,
            dtype: str, group: str) -> None:
        dt = DTYPES[dtype]
        if impl == "fused":
            check_fused(fused, reference, make, dt, device)
        fn = fused if impl == "fused" else reference
        train = mode == "fwd+bwd"

        def call(args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor, ...]:
            with autocast(device, dt):
                return outputs(fn(*args, **kwargs))

        args, kwargs = make(dt, train)
        grads = [torch.randn_like(o) for o in call(args, kwargs)]
        del args, kwargs

        def setup() -> tuple[tuple, dict[str, Any]]:
            for p in params:
                p.grad = None
            inputs = make(dt, train)
            torch.cuda.synchronize(device)
            return inputs

        def target(*args: Any, **kwargs: Any) -> None:
            if train:
                torch.autograd.backward(call(args, kwargs), grads)
            else:
                with torch.no_grad():
                    call(args, kwargs)
            torch.cuda.synchronize(device)

        benchmark.group = group
        benchmark.extra_info.update({"impl": impl, "mode": mode, "dtype": dtype, **env_record})
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    return run


def depthwise(channels: int, device: torch.device) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, device=device)


@cases(BLOCK_GRIDS)
def test_linear_attention(bench, device, impl, mode, dtype, grid):
    fused = load_kernel("linear_attention", "linear_attention")
    hw, n = (grid, grid), grid * grid
    lepe = depthwise(DIM, device)
    # The reference block passes its stored RoPE table; the fused kernel computes the angles itself.
    reference = functools.partial(linear_attention_ref, rotations=rope_table(grid, grid, DIM, device=device))

    def make(dt, requires_grad):
        qk, v, g = (activation((BATCH, n, c), dt, requires_grad, device) for c in (2 * DIM, DIM, DIM))
        return (qk, v, g, lepe.weight, lepe.bias, hw, HEADS), {}

    bench(fused, reference, make, list(lepe.parameters()), impl, mode, dtype,
          f"linear_attention {mode} {dtype} {grid_id(grid)}")


@cases(BLOCK_GRIDS)
def test_cpe_residual_norm(bench, device, impl, mode, dtype, grid):
    fused = load_kernel("dwconv", "cpe_residual_norm")
    hw, n = (grid, grid), grid * grid
    cpe, norm = depthwise(DIM, device), nn.LayerNorm(DIM, device=device)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    nn.init.normal_(norm.bias, 0.0, 0.1)

    def make(dt, requires_grad):
        x = activation((BATCH, n, DIM), dt, requires_grad, device)
        return (x, cpe.weight, cpe.bias, norm.weight, norm.bias, hw, norm.eps), {}

    bench(fused, cpe_residual_norm_ref, make, [*cpe.parameters(), *norm.parameters()], impl, mode, dtype,
          f"cpe_residual_norm {mode} {dtype} {grid_id(grid)}")


@cases(BLOCK_GRIDS)
def test_dwconv_silu(bench, device, impl, mode, dtype, grid):
    fused = load_kernel("dwconv", "dwconv_silu")
    hw, n = (grid, grid), grid * grid
    conv = depthwise(DIM, device)

    def make(dt, requires_grad):
        return (activation((BATCH, n, DIM), dt, requires_grad, device), conv.weight, conv.bias, hw), {}

    bench(fused, dwconv_silu_ref, make, list(conv.parameters()), impl, mode, dtype,
          f"dwconv_silu {mode} {dtype} {grid_id(grid)}")


@cases(SAMPLING_GRIDS)
def test_patch_merging(bench, device, impl, mode, dtype, grid):
    fused = load_kernel("sampling", "patch_merging")
    hw = (grid, grid)
    module = PatchMerging(hw, DIM).to(device)
    c0, c1, c2 = module.conv

    def make(dt, requires_grad):
        x = activation((BATCH, grid * grid, DIM), dt, requires_grad, device)
        return (x, hw, c0.conv.weight, c0.conv.bias, c1.conv.weight, c1.conv.bias, c2.conv.weight, c2.conv.bias,
                c2.norm), {}

    bench(fused, patch_merging_ref, make, list(module.parameters()), impl, mode, dtype,
          f"patch_merging {mode} {dtype} {grid_id(grid)} C={DIM}")


@cases(tuple(g // 2 for g in SAMPLING_GRIDS))
def test_patch_expand(bench, device, impl, mode, dtype, grid):
    fused = load_kernel("sampling", "patch_expand")
    hw, dim = (grid, grid), 2 * DIM
    module = PatchExpand(hw, dim).to(device)
    c0, c1, c2 = module.conv

    def make(dt, requires_grad):
        x = activation((BATCH, grid * grid, dim), dt, requires_grad, device)
        return (x, hw, c0.conv.weight, c0.conv.bias, c1.weight, c2.conv.weight, c2.conv.bias, c2.norm,
                module.norm.weight, module.norm.bias, module.norm.eps), {}

    bench(fused, patch_expand_ref, make, list(module.parameters()), impl, mode, dtype,
          f"patch_expand {mode} {dtype} {grid_id(grid)} C={dim}")


@cases(SAMPLING_GRIDS)
def test_final_expand(bench, device, impl, mode, dtype, grid):
    fused = load_kernel("sampling", "final_expand")
    hw = (grid, grid)
    module = FinalPatchExpand_X4(hw, DIM).to(device)

    def make(dt, requires_grad):
        x = activation((BATCH, grid * grid, DIM), dt, requires_grad, device)
        return (x, hw, module.expand.weight, module.norm.weight, module.norm.bias, module.norm.eps), {}

    bench(fused, final_expand_ref, make, list(module.parameters()), impl, mode, dtype,
          f"final_expand {mode} {dtype} {grid_id(grid)} C={DIM}")
