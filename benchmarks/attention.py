"""Check and time the fused MLLA linear attention (``kernels/linear_attention.py``) on a GPU.

1. Correctness of the compiled kernels: the output and the gradients of qk, v, g, lepe weight and
   bias against the float64 reference op (``reference/ops.py``, float64 RoPE table) under the test
   suite's rule (``tests/tolerance.py``): fp32 relative error <= 1e-5; bf16 at most twice PyTorch's
   own bf16 error plus a floor (the fused op gets bf16 activations with fp32 parameters, as under
   autocast). Cases: odd grids, the mixed-RoPE head (C = 96), real sizes (56^2 ... 512^2, C 64 ... 512,
   the 224^2 training batch), 2048^2 (4M tokens), the op inside ``torch.compile(fullgraph=True)``,
   inputs whose token offsets pass 2^31 elements (views of a wide buffer), and a batch whose outputs
   pass 2^31 elements (last sample checked).
2. Timing (C = 64, B = 2, bf16 by default, 512^2 and 1024^2) of ``fwd`` and ``fwd+bwd`` for ``triton``
   (this op), ``eager`` (the reference op, all bf16, RoPE table made outside the timed region) and
   ``compile`` (the reference under ``torch.compile``). Medians of ``triton.testing.do_bench`` (L2 flushed
   before each call); compilation and warm-up happen before; inputs are random. Peak memory: the
   allocator's peak during one call above what was allocated before it. Bandwidth = the bytes the op
   must move / time, E = B*N*C elements of s bytes: fwd 5*E*s (read qk (2E), v, g; write y), fwd+bwd
   14*E*s (+ read qk, v, g, dy; write dqk (2E), dv, dg), next to the measured copy bandwidth.
   Per-kernel times of one fused fwd+bwd come from the CUDA profiler.
3. ``--tune``: before 1 and 2, a coordinate search over the launch configuration
   (``LinearAttentionConfig``) on fwd+bwd at the first timed case; the best one is used for the rest
   and printed, to be made the default.

Order: tuning (if asked), then each timed case (checked first), the timing table, then the check-only
cases; every result is written as soon as it exists, so a run cut short keeps what it measured.
A case whose check fails is still timed, but no speedup or bandwidth is reported for it.
Prints a summary and writes ``attention.csv``, ``attention.json`` and ``attention.log`` to ``--out``'s card folder.

``--resource-usage`` needs no GPU: it compiles the four kernels ahead of time for sm_90 with Triton's
CUDA backend (and the ptxas it bundles) and prints registers and stack (spill) bytes per thread for
each launch configuration the tuner tries, to choose configurations before spending GPU time.

    python benchmarks/attention.py --tune --out "$OUT"   # the full GPU run
    python benchmarks/attention.py --cpu-smoke            # tiny cases through the Triton interpreter on the CPU
    python benchmarks/attention.py --resource-usage       # registers and spills per kernel, on any machine
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make the `benchmarks` folder importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the project's tolerance rule

from benchmarks.common import (
    add_output_argument,
    bench_ms,
    describe_environment,
    describe_error,
    environment,
    fmt_bytes,
    fmt_ms,
    format_table,
    free_memory,
    is_oom,
    output_dir,
    peak_bytes,
    write_csv,
    write_json,
)
from mlla_fast.reference.ops import linear_attention_ref, rope_table

from tolerance import FP32_RTOL, LOWP_FACTOR, LOWP_FLOOR, rel_err

NAMES = ("qk", "v", "g", "lepe_weight", "lepe_bias")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("triton", "eager", "compile")
MIN_PASSES = {"fwd": 5, "fwd+bwd": 14}  # passes over a (B, N, C) tensor the op must make (see above)
BANDWIDTH_TARGET = 0.6
SPEEDUP_TARGETS = {"eager": 8.0, "compile": 3.0}

# (B, H, W, C) checked in fp32 and bf16: odd grids, the mixed head, real sizes, 4M tokens.
GPU_CHECKS = [(3, 13, 17, 96), (1, 1, 333, 128), (2, 97, 61, 64), (48, 56, 56, 64), (2, 56, 56, 512),
              (2, 112, 112, 256), (2, 224, 224, 128), (1, 512, 512, 64), (1, 2048, 2048, 32)]
GPU_TIMED = [(2, 512, 512, 64), (2, 1024, 1024, 64)]
SMOKE_CHECKS = [(2, 5, 7, 96)]
SMOKE_TIMED = [(1, 6, 8, 64)]
# Large-offset checks (B, H, W, C, token stride of the wide buffer / batch size) and their CPU stand-ins.
GPU_WIDE = (1, 256, 256, 64, 32832)  # 65535 * 32832 > 2^31 elements
GPU_BATCH = (1025, 64, 64, 512)  # B * N * C > 2^31 elements
SMOKE_WIDE = (1, 4, 5, 32, 200)
SMOKE_BATCH = (3, 4, 5, 64)

# The launch-configuration search: each knob's values, tried one knob at a time.
TUNE_KNOBS: list[dict[str, Any]] = [
    {"lowp_dot_precision": v} for v in ("tf32", "lowp-operands")
] + [
    {"pair_loads": v} for v in ("split", "strided")
] + [
    {"trig": v} for v in ("table", "compute", "reduced")
] + [
    {"fwd_reduce_block_n": n, "fwd_reduce_warps": w} for n, w in ((64, 4), (128, 4), (128, 8), (256, 8))
] + [
    {"fwd_out_block_n": n, "fwd_out_warps": w}
    for n, w in ((32, 2), (32, 4), (64, 2), (64, 4), (64, 8), (128, 4), (128, 8), (128, 16))
] + [
    {"bwd_q_block_n": n, "bwd_q_warps": w} for n, w in ((32, 2), (32, 4), (64, 4), (64, 8), (64, 16), (128, 8))
] + [
    {"bwd_kv_block_n": n, "bwd_kv_warps": w} for n, w in ((32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8))
] + [
    {"fwd_out_maxnreg": n} for n in (0, 96, 128)
] + [
    {"bwd_q_maxnreg": n} for n in (0, 128, 168)
] + [
    {"programs_per_sm": v} for v in (2, 4, 8, 16)
]


def kernels():
    """The kernel module, imported late: TRITON_INTERPRET must be set before triton is first imported."""
    from mlla_fast.kernels import linear_attention

    return linear_attention


def parse_case(text: str) -> tuple[int, int, int, int]:
    try:
        case = tuple(int(v) for v in text.split(","))
    except ValueError:
        case = ()
    if len(case) != 4 or min(case) < 1 or case[3] % 32:
        raise argparse.ArgumentTypeError(f"a case is B,H,W,C with positive integers and C % 32 == 0, got {text!r}")
    return case


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run tiny cases through the Triton interpreter on the CPU (numbers mean nothing)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"], help="timed dtypes")
    parser.add_argument("--cases", nargs="+", type=parse_case, default=None, metavar="B,H,W,C",
                        help="timed cases (default: C=64, B=2 at 512^2 and 1024^2)")
    parser.add_argument("--tune", action="store_true", help="search the launch configuration first")
    parser.add_argument("--resource-usage", choices=["default", "all"], nargs="?", const="all", default=None,
                        help="compile the kernels for sm_90 without a GPU and print registers and spills, for "
                             "the current configuration or for every choice the tuner tries (default: all)")
    parser.add_argument("--no-checks", action="store_true", help="skip the check-only cases, which run after the "
                                                                  "timed cases (those are always checked)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--config", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override fields of the kernels' CONFIG for this run, e.g. trig=reduced")
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser)
    return parser.parse_args(argv)


class Log:
    """print() that also keeps the lines for the log file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


# ----------------------------------------------------------------------------------------------------------
# Inputs, runs and the correctness rule
# ----------------------------------------------------------------------------------------------------------


def make_inputs(B: int, H: int, W: int, C: int, device: torch.device, seed: int, gate: bool = True,
                dtype: torch.dtype = torch.float32) -> dict[str, Tensor | None]:
    """Random qk (B, N, 2C) (scaled by 3, so phi's exp branch matters), v, g (B, N, C), lepe weight, bias."""
    gen = torch.Generator(device=device).manual_seed(seed)
    N = H * W

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * scale).to(dtype)

    return {"qk": randn(B, N, 2 * C, scale=3.0), "v": randn(B, N, C), "g": randn(B, N, C) if gate else None,
            "lepe_weight": randn(C, 1, 3, 3, scale=1 / 3), "lepe_bias": randn(C)}


def leaves(inputs: dict[str, Tensor | None], act: torch.dtype, param: torch.dtype) -> dict[str, Tensor | None]:
    """Copies of the inputs as leaves that require grad: activations in act, LePE parameters in param."""
    out = {}
    for name, x in inputs.items():
        if x is not None:
            x = x.detach().to(param if name.startswith("lepe") else act).clone().requires_grad_()
        out[name] = x
    return out


def forward_backward(fn: Callable[..., Tensor], inputs: dict[str, Tensor | None], hw: tuple[int, int],
                     heads: int, dy: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """fn's output and the gradients of the inputs that require grad, for the cotangent dy."""
    y = fn(*(inputs[k] for k in NAMES), hw, heads, **kwargs)
    y.backward(dy.to(y.dtype))
    return y.detach(), {k: x.grad for k, x in inputs.items() if x is not None and x.requires_grad}


def reference64(inputs: dict[str, Tensor | None], hw: tuple[int, int], heads: int,
                dy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    table = rope_table(*hw, inputs["v"].shape[-1], device=inputs["v"].device, dtype=torch.float64)
    return forward_backward(linear_attention_ref, leaves(inputs, torch.float64, torch.float64), hw, heads,
                            dy.double(), rotations=table)


def judge(dtype: torch.dtype, got: tuple[Tensor, dict[str, Tensor]], ref64: tuple[Tensor, dict[str, Tensor]],
          own: tuple[Tensor, dict[str, Tensor]] | None) -> dict[str, Any]:
    """Errors of the output and every gradient against float64, the rule's bounds, and the verdict."""
    errors, bounds = {}, {}
    pairs = [("y", got[0], ref64[0], None if own is None else own[0])]
    pairs += [(f"d{k}", g, ref64[1][k], None if own is None else own[1][k]) for k, g in got[1].items()]
    for name, out, ref, lowp in pairs:
        errors[name] = rel_err(out, ref)
        bounds[name] = FP32_RTOL if lowp is None else LOWP_FACTOR * rel_err(lowp, ref) + LOWP_FLOOR[dtype]
    failed = [k for k in errors if not errors[k] <= bounds[k]]
    detail = ", ".join(f"{k} {errors[k]:.1e}{' > ' + format(bounds[k], '.1e') if k in failed else ''}"
                       for k in errors)
    if dtype != torch.float32 or failed:
        detail += f" (bounds: {', '.join(f'{k} {v:.1e}' for k, v in bounds.items())})"
    return {"passed": not failed, "detail": detail, "errors": errors, "bounds": bounds}


def guarded(check: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run a check; an OOM or an error fails it with the reason instead of ending the run."""
    try:
        result = check()
    except Exception as exc:
        result = {"passed": False, "detail": ("out of memory: " if is_oom(exc) else "error: ") + describe_error(exc)}
    free_memory(device)
    return result


def check_case(case: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
               seed: int) -> dict[str, Any]:
    """The fused op (dtype activations, fp32 parameters) against float64 on one (B, H, W, C)."""
    la = kernels()
    B, H, W, C = case
    # activations rounded to dtype first: the float64 reference sees exactly what the kernels see
    base = {k: (x.to(dtype).float() if x is not None and k in ("qk", "v", "g") else x)
            for k, x in make_inputs(B, H, W, C, device, seed).items()}
    dy = torch.randn(B, H * W, C, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1))
    got = forward_backward(la.linear_attention, leaves(base, dtype, torch.float32), (H, W), C // 32, dy)
    ref = reference64(base, (H, W), C // 32, dy)
    own = None
    if dtype != torch.float32:
        own = forward_backward(linear_attention_ref, leaves(base, dtype, dtype), (H, W), C // 32, dy)
    return judge(dtype, got, ref, own)


def check_wide_views(case: tuple[int, int, int, int, int], device: torch.device, seed: int) -> dict[str, Any]:
    """bf16 qk, v, g and dy as column slices of (B, N, stride) buffers: token offsets beyond 2^31 elements."""
    la = kernels()
    B, H, W, C, stride = case
    N = H * W
    base = make_inputs(B, H, W, C, device, seed)
    wide = torch.empty(B, N, stride, device=device, dtype=torch.bfloat16)
    views = {"qk": wide[..., :2 * C], "v": wide[..., 2 * C:3 * C], "g": wide[..., 3 * C:4 * C]}
    wide_dy = torch.empty(B, N, stride, device=device, dtype=torch.bfloat16)
    dy = wide_dy[..., -C:]
    dy.copy_(torch.randn(B, N, C, device=device))
    inputs = leaves(base, torch.bfloat16, torch.float32)
    for name, view in views.items():
        view.copy_(inputs[name].detach())
        inputs[name] = view.requires_grad_()
    got = forward_backward(la.linear_attention, inputs, (H, W), C // 32, dy)
    base = {k: (inputs[k].detach().float() if k in views else x) for k, x in base.items()}
    ref = reference64(base, (H, W), C // 32, dy.float())
    own = forward_backward(linear_attention_ref, leaves(base, torch.bfloat16, torch.bfloat16), (H, W), C // 32, dy)
    return judge(torch.bfloat16, got, ref, own)


def check_batch_offsets(case: tuple[int, int, int, int], device: torch.device, seed: int) -> dict[str, Any]:
    """bf16, no gate, a batch whose tensors pass 2^31 elements: the last sample's output, dqk and dv."""
    la = kernels()
    B, H, W, C = case
    hw, heads = (H, W), C // 32
    inputs = leaves(make_inputs(B, H, W, C, device, seed, gate=False, dtype=torch.bfloat16), torch.bfloat16,
                    torch.float32)
    dy = torch.randn(B, H * W, C, device=device, dtype=torch.bfloat16)
    y, grads = forward_backward(la.linear_attention, inputs, hw, heads, dy)
    last = {k: (x.detach()[-1:].float() if k in ("qk", "v") else x) for k, x in inputs.items()}
    got = (y[-1:], {k: grads[k][-1:] for k in ("qk", "v")})
    del y, grads, inputs
    free_memory(device)
    ref = reference64(last, hw, heads, dy[-1:].float())
    own = forward_backward(linear_attention_ref, leaves(last, torch.bfloat16, torch.bfloat16), hw, heads, dy[-1:])
    ref = (ref[0], {k: ref[1][k] for k in ("qk", "v")})
    own = (own[0], {k: own[1][k] for k in ("qk", "v")})
    return judge(torch.bfloat16, got, ref, own)


def check_compiled(device: torch.device, seed: int, backend: str) -> dict[str, Any]:
    """The op inside torch.compile(fullgraph=True) gives what it gives eagerly (bf16, 2x24x20x96)."""
    la = kernels()
    B, H, W, C = 2, 24, 20, 96
    base = make_inputs(B, H, W, C, device, seed)
    dy = torch.randn(B, H * W, C, device=device)
    base = {k: (x.to(torch.bfloat16).float() if x is not None and k in ("qk", "v", "g") else x)
            for k, x in base.items()}
    torch._dynamo.reset()
    compiled = torch.compile(la.linear_attention, fullgraph=True, backend=backend)
    got = forward_backward(compiled, leaves(base, torch.bfloat16, torch.float32), (H, W), 3, dy)
    eager = forward_backward(la.linear_attention, leaves(base, torch.bfloat16, torch.float32), (H, W), 3, dy)
    errors = {"y": rel_err(got[0], eager[0])} | {f"d{k}": rel_err(g, eager[1][k]) for k, g in got[1].items()}
    worst = max(errors.values())
    return {"passed": worst <= 1e-6, "detail": f"largest relative difference to eager {worst:.1e} (<= 1e-6)",
            "errors": errors}


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------







def steps(impl: str, case: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int,
          compile_backend: str) -> tuple[dict[str, Callable[[], None]], list[Tensor]]:
    """The fwd and fwd+bwd calls of one implementation on fresh random inputs, and its leaves."""
    B, H, W, C = case
    hw, heads = (H, W), C // 32
    inputs = leaves(make_inputs(B, H, W, C, device, seed, dtype=dtype), dtype,
                    torch.float32 if impl == "triton" else dtype)
    args = [inputs[k] for k in NAMES]
    dy = torch.randn(B, H * W, C, device=device, dtype=dtype)
    if impl == "triton":
        la = kernels()

        def fn(*t: Tensor) -> Tensor:
            return la.linear_attention(*t, hw, heads)
    else:
        table = rope_table(H, W, C, device=device)  # the block's buffer: made once, outside the timed calls

        def fn(*t: Tensor) -> Tensor:
            return linear_attention_ref(*t, hw, heads, rotations=table)

        if impl == "compile":
            torch._dynamo.reset()
            fn = torch.compile(fn, backend=compile_backend, dynamic=False)

    def fwd() -> None:
        fn(*args)

    def fwd_bwd() -> None:
        for t in args:  # fresh gradients each call: accumulating into the last call's would time an extra add
            if t is not None:
                t.grad = None
        fn(*args).backward(dy)

    return {"fwd+bwd": fwd_bwd, "fwd": fwd}, args


def time_case(case: tuple[int, int, int, int], dtype_name: str, impls: Sequence[str], device: torch.device,
              seed: int, compile_backend: str) -> list[dict[str, Any]]:
    """One row per (impl, mode); a failure is recorded in the row, never raised."""
    dtype = DTYPES[dtype_name]
    B, H, W, C = case
    rows = []
    for impl in impls:
        meta = [{"dtype": dtype_name, "B": B, "H": H, "W": W, "C": C, "mode": mode, "impl": impl,
                 "min_bytes": MIN_PASSES[mode] * B * H * W * C * dtype.itemsize} for mode in MIN_PASSES]
        try:
            calls, params = steps(impl, case, dtype, device, seed, compile_backend)
        except Exception as exc:
            rows += [m | {"status": "oom" if is_oom(exc) else "error", "note": describe_error(exc)} for m in meta]
            continue
        first_call_s = None
        for row in meta:
            step = calls[row["mode"]]
            try:
                if first_call_s is None:
                    t0 = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    row["first_call_s"] = first_call_s = time.perf_counter() - t0
                row["median_ms"], row["q25_ms"], row["q75_ms"] = bench_ms(step, params, device, rep_ms=200)
                row["peak_bytes"] = peak_bytes(step, params, device)
                row["status"] = "ok"
            except Exception as exc:
                row["status"], row["note"] = ("oom" if is_oom(exc) else "error"), describe_error(exc)
            rows.append(row)
        del calls, params
        free_memory(device)
    return rows


def kernel_breakdown(case: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int) -> str:
    """CUDA time per kernel of one fused fwd+bwd, from the profiler (the host-side sums included)."""
    if device.type != "cuda":
        return "(no CUDA profiler on the CPU)"
    calls, params = steps("triton", case, dtype, device, seed, "inductor")
    calls["fwd+bwd"]()
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        calls["fwd+bwd"]()
        torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if us:
            totals[event.key] = totals.get(event.key, 0.0) + us
    del calls, params
    free_memory(device)
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return ", ".join(f"{name[:40]} {us / 1e3:.3f} ms" for name, us in top)


def tune(case: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int, log: Log):
    """Coordinate search over TUNE_KNOBS on fwd+bwd; sets and returns the best LinearAttentionConfig."""
    la = kernels()
    calls, params = steps("triton", case, dtype, device, seed, "inductor")
    best, best_ms, tried = la.CONFIG, None, {}
    for knob in TUNE_KNOBS:
        config = dataclasses.replace(best, **knob)
        if config in tried:
            continue
        la.CONFIG = config
        try:
            calls["fwd+bwd"]()
            ms = bench_ms(calls["fwd+bwd"], params, device, rep_ms=200)[0]
        except Exception as exc:
            log(f"  tune {knob}: {describe_error(exc)}")
            continue
        tried[config] = ms
        if best_ms is None or ms < best_ms:
            best, best_ms = config, ms
        log(f"  tune {knob}: {fmt_ms(ms)} (best {fmt_ms(best_ms)})")
    la.CONFIG = best
    del calls, params
    free_memory(device)
    return best


# The four kernels, the CONFIG prefix of their launch parameters, and their activation-dtype pointers.
KERNELS = {"fwd_reduce": "_la_fwd_reduce_kernel", "fwd_out": "_la_fwd_out_kernel", "bwd_q": "_la_bwd_q_kernel",
           "bwd_kv": "_la_bwd_kv_kernel"}
ACTIVATION_POINTERS = {"p_q", "p_k", "p_v", "p_g", "p_dy", "p_y", "p_dq", "p_dk", "p_dv", "p_dg", "p_do"}


def resource_usage(C: int, arch: int, all_configs: bool, log: Log) -> int:
    """Compile each kernel for sm_<arch> (no GPU needed), for bf16 and fp32 activations, at the current
    CONFIG or (all_configs) at every (block, warps) choice of TUNE_KNOBS, and log registers and stack
    bytes per thread (stack beyond the 32 bytes of libdevice's cos/sin slow path is register spilling).
    Pointers and strides are taken as 16-aligned, as in real launches. Returns the number of failures."""
    import triton
    from triton.backends.compiler import GPUTarget

    la = kernels()
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    failures = 0
    for dtype_name in ("bf16", "fp32"):
        for prefix, name in KERNELS.items():
            fn = getattr(la, name)
            current = {f"{prefix}_block_n": getattr(la.CONFIG, f"{prefix}_block_n"),
                       f"{prefix}_warps": getattr(la.CONFIG, f"{prefix}_warps")}
            choices = [k for k in TUNE_KNOBS if f"{prefix}_block_n" in k] if all_configs else [current]
            for knob in choices:
                block_n, warps = knob[f"{prefix}_block_n"], knob[f"{prefix}_warps"]
                consts = {"C": C, "NUM_HEADS": C // 32, "HAS_GATE": True, "BLOCK_N": block_n, "EPS": 1e-6,
                          **la._dot_args(torch.float32 if dtype_name == "fp32" else torch.bfloat16),
                          "SPLIT_PAIRS": la.CONFIG.pair_loads == "split", "TRIG": la.CONFIG.trig,
                          "GATE_GRAD": False, "GATE_SILU": False, "WRITE_A": False, "A_OVER_DY": False,
                          "DK_OVER_K": False, "PROJECT": False, "HAS_PBIAS": False, "SCALE": False,
                          "ACC_DV": False, "WRITE_O": False}
                wanted = [p.name for p in fn.params if p.is_constexpr]
                missing = sorted(set(wanted) - set(consts))
                if missing:
                    raise ValueError(f"{name} has constexpr argument(s) {missing} that resource_usage gives no value "
                                     "for; without one, it would compile as a runtime argument, unlike real launches")
                consts = {k: consts[k] for k in wanted}
                signature, attrs = {}, {}
                for i, arg in enumerate(fn.arg_names):
                    if arg in consts:
                        signature[arg] = "constexpr"
                    elif arg.startswith("p_"):
                        signature[arg] = f"*{dtype_name}" if arg in ACTIVATION_POINTERS else "*fp32"
                    else:
                        signature[arg] = "fp32" if arg == "inv_n" else "i32"
                    if arg.startswith(("p_", "s_")):
                        attrs[(i,)] = [["tt.divisibility", 16]]
                label = f"{dtype_name} {prefix:10s} block {block_n:3d} warps {warps}"
                try:
                    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                except Exception as exc:
                    failures += 1
                    log(f"  {label}: FAILED to compile: {describe_error(exc)}")
                    continue
                usage = "compiled (no cuobjdump to read its resource usage)"
                if cuobjdump.exists():
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(compiled.asm["cubin"])
                        f.flush()
                        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                              capture_output=True, text=True).stdout
                    usage = " ".join(re.findall(r"(?:REG|STACK):\d+", dump)) or usage
                log(f"  {label}: {usage}")
    return failures


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def annotate(rows: list[dict[str, Any]], passed: bool, copy_gbs: float | None) -> None:
    """Bandwidth and speedups on the triton rows of one case, unless its check failed."""
    by = {(r["impl"], r["mode"]): r for r in rows}
    for r in rows:
        r["triton_check"] = "passed" if passed else "FAILED"
        if r["impl"] != "triton" or r.get("status") != "ok":
            continue
        if not passed:
            r["note"] = "check failed: no speedup or bandwidth reported"
            continue
        r["gbs"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
        if copy_gbs:
            r["copy_fraction"] = r["gbs"] / copy_gbs
        for impl in ("eager", "compile"):
            other = by.get((impl, r["mode"]))
            if other is not None and other.get("status") == "ok":
                r[f"speedup_vs_{impl}"] = other["median_ms"] / r["median_ms"]


def report(rows: list[dict[str, Any]]) -> str:
    keyed = {(r["dtype"], r["B"], r["H"], r["W"], r["C"], r["mode"], r["impl"]): r for r in rows}
    table = []
    for r in rows:
        if r["impl"] != "triton":
            continue
        key = (r["dtype"], r["B"], r["H"], r["W"], r["C"], r["mode"])
        others = {impl: keyed.get((*key, impl), {}) for impl in IMPLS}

        def ms(row: dict[str, Any]) -> str:
            return fmt_ms(row.get("median_ms")) if row.get("status") == "ok" else row.get("status", "-")

        def ratio(row: dict[str, Any], impl: str) -> str:
            name = f"speedup_vs_{impl}"
            if name not in row:
                return "-"
            return f"{row[name]:.2f}x" + ("" if row[name] >= SPEEDUP_TARGETS[impl] else " (<target)")

        frac = r.get("copy_fraction")
        table.append([
            r["dtype"], f"{r['B']}x{r['H']}x{r['W']}x{r['C']}", r["mode"], r["triton_check"],
            ms(r), ms(others["eager"]), ms(others["compile"]), ratio(r, "eager"), ratio(r, "compile"),
            f"{r['gbs']:.0f}" if "gbs" in r else "-",
            "-" if frac is None else f"{100 * frac:.0f}%{'' if frac >= BANDWIDTH_TARGET else ' (<60%)'}",
            " / ".join(fmt_bytes(o.get("peak_bytes")) for o in others.values()),
        ])
    headers = ["dtype", "BxHxWxC", "mode", "check", "triton", "eager", "compile", "vs eager (>=8x)",
               "vs compile (>=3x)", "GB/s", "of copy", "peak mem triton / eager / compile"]
    return format_table(headers, table)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resource_usage:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("--resource-usage compiles real kernels: unset TRITON_INTERPRET.")
            return 2
        log = Log()
        log(f"Registers and stack bytes per thread, sm_90, C=64, configuration {kernels().CONFIG}:")
        failures = resource_usage(64, 90, args.resource_usage == "all", log)
        log(f"{failures} kernel(s) failed to compile" if failures else "all kernels compiled")
        return 1 if failures else 0
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by the kernels)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("No CUDA device: run this on a GPU, or pass --cpu-smoke for a tiny interpreter run.")
        return 2
    la = kernels()
    try:
        la.CONFIG = la.CONFIG.with_overrides(args.config)
    except ValueError as exc:
        print(f"--config: {exc}")
        return 2
    smoke = args.cpu_smoke
    timed = args.cases or (SMOKE_TIMED if smoke else GPU_TIMED)
    compile_backend = "aot_eager" if smoke else "inductor"
    impls = [i for i in IMPLS if not (args.no_compile and i == "compile")]

    env = environment(device)
    out = output_dir(args.out, env)
    log = Log()
    log(f"Fused MLLA linear attention: check and timing | {env['label']}")
    log(describe_environment(env))
    checks: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if out is None:
            return
        write_csv(out / "attention.csv", rows, env)
        write_json(out / "attention.json", {"benchmark": "attention", "env": env, "args": vars(args) | {"out": None},
                                            "config": dataclasses.asdict(la.CONFIG), "checks": checks,
                                            "results": rows})
        (out / "attention.log").write_text("\n".join(log.lines) + "\n")

    def record(name: str, result: dict[str, Any]) -> None:
        checks.append({"case": name, **result})
        log(f"[{'pass' if result['passed'] else 'FAIL'}] {name}: {result['detail']}")
        save()

    if args.tune:
        case = timed[0]
        log(f"tuning the launch configuration on fwd+bwd {args.dtypes[0]} {'x'.join(map(str, case))}:")
        best = tune(case, DTYPES[args.dtypes[0]], device, args.seed, log)
        log(f"best: {best}")
    log(f"configuration: {la.CONFIG}")

    for case in timed:
        for dtype_name in args.dtypes:
            label = f"{dtype_name} {'x'.join(map(str, case))}"
            result = guarded(lambda case=case, dtype_name=dtype_name: check_case(case, DTYPES[dtype_name], device,
                                                                                 args.seed), device)
            record(label, result)
            case_rows = time_case(case, dtype_name, impls, device, args.seed, compile_backend)
            annotate(case_rows, result["passed"], env["copy_bandwidth_gbs"])
            rows.extend(case_rows)
            for r in case_rows:
                log(f"    {r['impl']:8s} {r['mode']:8s} {fmt_ms(r.get('median_ms'))}"
                    + (f" [{r['status']}: {r.get('note', '')}]" if r.get("status") != "ok" else ""))
            try:
                log(f"    per kernel (fwd+bwd): {kernel_breakdown(case, DTYPES[dtype_name], device, args.seed)}")
            except Exception as exc:
                log(f"    per kernel: {describe_error(exc)}")
            save()

    if rows:
        log()
        log(report(rows))
        log()

    if not args.no_checks:
        record("torch.compile(fullgraph=True) vs eager", guarded(lambda: check_compiled(device, args.seed,
                                                                                         compile_backend), device))
        for case in SMOKE_CHECKS if smoke else GPU_CHECKS:
            for dtype_name, dtype in DTYPES.items():
                record(f"{dtype_name} {'x'.join(map(str, case))}",
                       guarded(lambda case=case, dtype=dtype: check_case(case, dtype, device, args.seed), device))
        B, H, W, C, stride = wide = SMOKE_WIDE if smoke else GPU_WIDE
        record(f"bf16 {B}x{H}x{W}x{C} as views of a {stride}-channel buffer (largest token offset "
               f"{(H * W - 1) * stride / 2**31:.2f} x 2^31)", guarded(lambda: check_wide_views(wide, device, args.seed),
                                                                      device))
        B, H, W, C = batch = SMOKE_BATCH if smoke else GPU_BATCH
        record(f"bf16 {B}x{H}x{W}x{C} no gate, last sample (qk {B * H * W * 2 * C / 2**31:.2f} x 2^31 elements)",
               guarded(lambda: check_batch_offsets(batch, device, args.seed), device))

    failed = [c for c in checks if not c["passed"]]
    log(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
        + ("" if not failed else ": FAILED " + "; ".join(c["case"] for c in failed)))
    if smoke:
        log("(CPU smoke run through the Triton interpreter: the times and bandwidths mean nothing)")
    save()
    if out is not None:
        log(f"wrote {out / 'attention.csv'}, {out / 'attention.json'}, {out / 'attention.log'}")
        save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
