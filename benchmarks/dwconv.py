"""Check and time the fused depthwise-stencil kernels (``kernels/dwconv.py``) on a GPU.

For each op (``cpe_residual_norm``, ``dwconv_silu``), dtype (bf16, fp32) and size:

1. Correctness of the compiled kernels at that size: outputs and the gradients of x and every parameter
   against the float64 reference op (``reference/ops.py``), under the test suite's rule
   (``tests/tolerance.py``): fp32 relative error <= 1e-5; bf16 at most twice PyTorch's own bf16 error
   plus a floor. Extra check-only cases cover an odd grid, a strided input view (a column slice of a
   wider GEMM output), C = 1024, and both ops inside ``torch.compile(fullgraph=True)``.
2. Timing of ``fwd`` (the forward of a training step: inputs require grad) and ``fwd+bwd`` (forward,
   then backward of fixed random output gradients) for ``triton`` (the fused kernels), ``eager``
   (the reference op) and ``compile`` (the reference under ``torch.compile``, static shapes).
   bf16: the fused op gets bf16 activations with fp32 parameters (as under autocast), the reference
   bf16 everything (PyTorch's own bf16 computation). Times are medians of ``triton.testing.do_bench``
   (L2 flushed before each call; calls are queued behind the flush, so host launch latency is hidden
   and the time is the device's). Peak memory is the allocator's peak during one fwd+bwd call above
   what was allocated before it.
3. Achieved bandwidth = the minimal bytes the op must move / median time, next to the card's measured
   copy bandwidth (read + write). Minimal bytes, E = B*N*C elements of s bytes (parameters ignored):
   cpe_residual_norm fwd 3*E*s (read x; write r, h), fwd+bwd 8*E*s (+ read x, r, dr, dh; write dx);
   dwconv_silu fwd 2*E*s (read x; write y), fwd+bwd 5*E*s (+ read x, dy; write dx). Target: >= 60%.

A case whose check fails is still timed, but no speedup or bandwidth claim is printed for it.
Prints a table and writes ``dwconv.csv``, ``dwconv.json`` and ``dwconv.log`` to ``--out``'s card folder.

    python benchmarks/dwconv.py --out "$OUT"                              # the GPU run
    python benchmarks/dwconv.py --out "$OUT" --tile-elements 1024 2048 4096  # also compare tile sizes
    python benchmarks/dwconv.py --cpu-smoke                                # a tiny case through the interpreter

Results are written after every case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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

from tolerance import FP32_RTOL, LOWP_FACTOR, LOWP_FLOOR, rel_err

OPS = ("cpe_residual_norm", "dwconv_silu")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
# Minimal passes over a (B, N, C) activation tensor each op must make (see the module docstring).
MIN_PASSES = {("cpe_residual_norm", "fwd"): 3, ("cpe_residual_norm", "fwd+bwd"): 8,
              ("dwconv_silu", "fwd"): 2, ("dwconv_silu", "fwd+bwd"): 5}
BANDWIDTH_TARGET = 0.6
# (B, H, W, C): one block at 512x512, batch 2 (first: the clearest bandwidth figure), then MLLA-UNet-T
# training at 224x224, batch 48 (stages 0-3).
GPU_CASES = [(2, 512, 512, 64), (48, 56, 56, 64), (48, 28, 28, 128), (48, 14, 14, 256), (48, 7, 7, 512)]
# Check-only cases: (B, H, W, C, strided input view).
GPU_CHECK_CASES = [(3, 97, 61, 96, False), (2, 64, 64, 128, True), (2, 33, 1, 1024, False), (1, 1, 300, 32, True)]
SMOKE_CASES = [(2, 5, 7, 64)]
SMOKE_CHECK_CASES = [(1, 3, 9, 32, True)]
# 64-bit offsets: B*N*C > 2**31 and the last sample starting past 2**31 (run last: 7 tensors of 5.4 GB for cpe).
GPU_LARGE_CASE = (5, 1024, 1024, 512)
SMOKE_LARGE_CASE = (2, 3, 4, 32)


def parse_case(text: str) -> tuple[int, int, int, int]:
    try:
        case = tuple(int(v) for v in text.split(","))
    except ValueError:
        case = ()
    if len(case) != 4 or min(case) < 1:
        raise argparse.ArgumentTypeError(f"a case is B,H,W,C with positive integers, got {text!r}")
    return case


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run a tiny case through the Triton interpreter on the CPU (numbers mean nothing)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--cases", nargs="+", type=parse_case, default=None, metavar="B,H,W,C",
                        help="timed cases (default: the MLLA-UNet-T stages at 224^2 batch 48 and 512^2 batch 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--tile-elements", nargs="+", type=int, default=None, metavar="N",
                        help="check and time the fused kernels with tiles of about N elements each "
                             "(default: the kernels' own setting)")
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
# Inputs and the three implementations
# ----------------------------------------------------------------------------------------------------------


def make_inputs(op: str, B: int, H: int, W: int, C: int, device: torch.device, seed: int,
                strided: bool = False) -> list[Tensor]:
    """fp32 x (B, H*W, C) (a column slice of a (B, H*W, 2C) tensor when strided) and the op's parameters,
    with non-trivial biases and norm parameters."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    x = (randn(B, H * W, 2 * C) + 0.5)[..., C:] if strided else randn(B, H * W, C) + 0.5
    params = [0.3 * randn(C, 1, 3, 3), 0.5 * randn(C)]
    if op == "cpe_residual_norm":
        params += [1.0 + 0.5 * randn(C), 0.5 * randn(C)]
    return [x, *params]


def cast_leaves(tensors: Sequence[Tensor], act: torch.dtype, param: torch.dtype | None) -> list[Tensor]:
    """Leaf copies requiring grad: x (first) in act, keeping its strides; parameters in param (None: as they are)."""
    x = tensors[0].detach()
    x = x if x.dtype == act else torch.empty_strided(x.shape, x.stride(), dtype=act, device=x.device).copy_(x)
    params = [p.detach().to(param or p.dtype) for p in tensors[1:]]
    return [t.requires_grad_() for t in (x, *params)]


def op_functions(op: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from mlla_fast.kernels.dwconv import cpe_residual_norm, dwconv_silu
    from mlla_fast.reference.ops import cpe_residual_norm_ref, dwconv_silu_ref

    return {"cpe_residual_norm": (cpe_residual_norm, cpe_residual_norm_ref),
            "dwconv_silu": (dwconv_silu, dwconv_silu_ref)}[op]


def as_list(outs: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    return list(outs) if isinstance(outs, tuple) else [outs]


def forward_backward(fn: Callable[..., Any], inputs: Sequence[Tensor], grad_outs: Sequence[Tensor]
                     ) -> list[Tensor]:
    """The outputs of fn(*inputs) followed by the gradients of every input, detached."""
    outs = as_list(fn(*inputs))
    grads = torch.autograd.grad(outs, inputs, grad_outs)
    return [t.detach() for t in (*outs, *grads)]


def output_names(op: str) -> list[str]:
    if op == "cpe_residual_norm":
        return ["r", "h", "dx", "d cpe_weight", "d cpe_bias", "d norm_weight", "d norm_bias"]
    return ["y", "dx", "d weight", "d bias"]


# ----------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------


def check(op: str, dtype: torch.dtype, case: tuple[int, int, int, int], device: torch.device, seed: int,
          strided: bool = False) -> dict[str, Any]:
    """The fused op's outputs and gradients against the float64 reference under the project's tolerance rule."""
    kernel, reference = op_functions(op)
    B, H, W, C = case
    base = make_inputs(op, B, H, W, C, device, seed, strided)
    n_out = 2 if op == "cpe_residual_norm" else 1
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    grads64 = [torch.randn(B, H * W, C, generator=gen, device=device).to(dtype).double() for _ in range(n_out)]
    hw = (H, W)
    errors, bounds = {}, {}
    try:
        got = forward_backward(lambda *t: kernel(*t, hw), cast_leaves(base, dtype, torch.float32),
                               [g.to(dtype) for g in grads64])
        # The reference sees exactly the values the kernel saw: x rounded to dtype, fp32 parameters.
        x_seen = base[0].to(dtype)
        ref = forward_backward(lambda *t: reference(*t, hw),
                               cast_leaves([x_seen, *base[1:]], torch.float64, torch.float64), grads64)
        own = None
        if dtype != torch.float32:
            own = forward_backward(lambda *t: reference(*t, hw), cast_leaves(base, dtype, dtype),
                                   [g.to(dtype) for g in grads64])
        for i, name in enumerate(output_names(op)):
            errors[name] = rel_err(got[i], ref[i])
            bounds[name] = FP32_RTOL if own is None else LOWP_FACTOR * rel_err(own[i], ref[i]) + LOWP_FLOOR[dtype]
    except Exception as exc:
        return {"passed": False, "detail": f"check could not run: {describe_error(exc)}", "errors": errors}
    failed = [k for k in errors if not errors[k] <= bounds[k]]
    detail = ", ".join(f"{k} {errors[k]:.1e}{' > ' if k in failed else ' <= '}{bounds[k]:.1e}" for k in errors)
    return {"passed": not failed, "detail": detail, "errors": errors, "bounds": bounds}


def check_compiled(op: str, device: torch.device, seed: int, backend: str) -> dict[str, Any]:
    """The fused op inside torch.compile(fullgraph=True) gives what it gives eagerly, outputs and gradients."""
    kernel, _ = op_functions(op)
    B, H, W, C = 2, 24, 20, 64
    base = make_inputs(op, B, H, W, C, device, seed, strided=True)
    n_out = 2 if op == "cpe_residual_norm" else 1
    grad_outs = [torch.randn(B, H * W, C, device=device) for _ in range(n_out)]

    def fn(*t: Tensor) -> Tensor | tuple[Tensor, ...]:
        return kernel(*t, (H, W))

    try:
        torch._dynamo.reset()
        eager = forward_backward(fn, cast_leaves(base, torch.float32, None), grad_outs)
        compiled = forward_backward(torch.compile(fn, backend=backend, fullgraph=True),
                                    cast_leaves(base, torch.float32, None), grad_outs)
    except Exception as exc:
        return {"passed": False, "detail": f"torch.compile(fullgraph=True) failed: {describe_error(exc)}"}
    worst = max(rel_err(a, b) for a, b in zip(compiled, eager, strict=True))
    return {"passed": worst == 0.0, "detail": f"largest relative difference to eager {worst:.1e} (expected 0)"}


def check_large_offsets(op: str, case: tuple[int, int, int, int], device: torch.device, seed: int) -> dict[str, Any]:
    """64-bit offsets: with B*N*C past 2**31 elements, the last sample's outputs and input gradient equal
    (bitwise) those of the same sample run on its own, where every offset is small."""
    kernel, _ = op_functions(op)
    B, H, W, C = case
    hw = (H, W)
    n_out = 2 if op == "cpe_residual_norm" else 1
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        params = [p.requires_grad_() for p in make_inputs(op, 1, 1, 1, C, device, seed)[1:]]
        x = torch.randn(B, H * W, C, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()
        grad_outs = [torch.randn(B, H * W, C, generator=gen, device=device, dtype=torch.bfloat16)
                     for _ in range(n_out)]
        outs = as_list(kernel(x, *params, hw))
        (dx,) = torch.autograd.grad(outs, [x], grad_outs)
        last = [t[-1].clone() for t in (*outs, dx)]
        del outs, dx
        x_last = x[-1:].detach().clone().requires_grad_()
        outs = as_list(kernel(x_last, *params, hw))
        (dx,) = torch.autograd.grad(outs, [x_last], [g[-1:] for g in grad_outs])
        alone = [t[0] for t in (*outs, dx)]
    except Exception as exc:
        return {"passed": False, "detail": f"could not run: {describe_error(exc)}"}
    finally:
        free_memory(device)
    equal = [torch.equal(a, b) for a, b in zip(last, alone, strict=True)]
    elements = B * H * W * C
    return {"passed": all(equal), "detail": f"{elements:,} elements (2**31 = {2**31:,}): last sample "
            + ("identical to running it alone" if all(equal) else "DIFFERS from running it alone")}


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------







def time_case(op: str, dtype_name: str, case: tuple[int, int, int, int], impls: Sequence[str], device: torch.device,
              seed: int, compile_backend: str) -> list[dict[str, Any]]:
    """One row per (impl, mode) for this op, dtype and case."""
    dtype = DTYPES[dtype_name]
    kernel, reference = op_functions(op)
    B, H, W, C = case
    hw = (H, W)
    base = make_inputs(op, B, H, W, C, device, seed)
    n_out = 2 if op == "cpe_residual_norm" else 1
    grad_outs = [torch.randn(B, H * W, C, device=device, dtype=dtype) for _ in range(n_out)]
    rows = []
    for impl in impls:
        inputs = cast_leaves(base, dtype, torch.float32 if impl == "triton" else dtype)
        op_fn = kernel if impl == "triton" else reference

        def fn(*t: Tensor, op_fn=op_fn) -> Tensor | tuple[Tensor, ...]:
            return op_fn(*t, hw)

        if impl == "compile":
            torch._dynamo.reset()  # a fresh static-shape compile per case, no recompile limit
            fn = torch.compile(fn, backend=compile_backend, dynamic=False)

        def fwd(fn=fn, inputs=inputs) -> None:
            fn(*inputs)

        def fwd_bwd(fn=fn, inputs=inputs) -> None:
            for t in inputs:  # fresh gradients each call: accumulating into the last call's would time an extra add
                t.grad = None
            torch.autograd.backward(as_list(fn(*inputs)), grad_outs)

        first_call_s = None
        for mode, step in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
            row = {"op": op, "dtype": dtype_name, "B": B, "H": H, "W": W, "C": C, "mode": mode, "impl": impl,
                   "min_bytes": MIN_PASSES[op, mode] * B * H * W * C * dtype.itemsize}
            try:
                if first_call_s is None:
                    t0 = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    first_call_s = time.perf_counter() - t0
                    row["first_call_s"] = first_call_s
                row["median_ms"], row["q25_ms"], row["q75_ms"] = bench_ms(step, inputs, device)
                row["peak_bytes"] = peak_bytes(step, inputs, device)
                row["status"] = "ok"
            except Exception as exc:
                row["status"], row["note"] = ("oom" if is_oom(exc) else "error"), describe_error(exc)
            rows.append(row)
        del inputs, fn
        free_memory(device)
    return rows


@contextlib.contextmanager
def tile_elements(n: int | None) -> Iterator[None]:
    """Run the fused kernels with tiles of about n elements (None: the module's default)."""
    from mlla_fast.kernels import dwconv

    saved = dwconv.TILE_ELEMENTS
    dwconv.TILE_ELEMENTS = n or saved
    try:
        yield
    finally:
        dwconv.TILE_ELEMENTS = saved


def annotate(rows: list[dict[str, Any]], copy_gbs: float | None) -> None:
    """Add bandwidth and speedups to the triton rows of one (op, dtype, case) whose check passed."""
    baseline = {(r["impl"], r["mode"]): r for r in rows if r["impl"] != "triton"}
    for r in rows:
        if r["impl"] != "triton" or r.get("status") != "ok":
            continue
        if r["triton_check"] != "passed":
            r["note"] = "check failed: no speedup or bandwidth reported"
            continue
        r["gbs"] = r["min_bytes"] / (r["median_ms"] * 1e-3) / 1e9
        if copy_gbs:
            r["copy_fraction"] = r["gbs"] / copy_gbs
        for impl in ("eager", "compile"):
            other = baseline.get((impl, r["mode"]))
            if other is not None and other.get("status") == "ok":
                r[f"speedup_vs_{impl}"] = other["median_ms"] / r["median_ms"]


def report(rows: list[dict[str, Any]]) -> str:
    """One line per triton row: its time, the baselines', speedups, bandwidth and peak memory."""
    table = []
    baseline = {(r["op"], r["dtype"], r["B"], r["H"], r["W"], r["C"], r["mode"], r["impl"]): r
                for r in rows if r["impl"] != "triton"}

    def ms(row: dict[str, Any]) -> str:
        return fmt_ms(row.get("median_ms")) if row.get("status") == "ok" else row.get("status", "-")

    def ratio(row: dict[str, Any], name: str) -> str:
        return f"{row[name]:.2f}x" if name in row else "-"

    for r in rows:
        if r["impl"] != "triton":
            continue
        key = (r["op"], r["dtype"], r["B"], r["H"], r["W"], r["C"], r["mode"])
        eager, compiled = baseline.get((*key, "eager"), {}), baseline.get((*key, "compile"), {})
        frac = r.get("copy_fraction")
        table.append([
            r["op"], r["dtype"], f"{r['B']}x{r['H']}x{r['W']}x{r['C']}", r["mode"], str(r["tile_elements"]),
            r["triton_check"], ms(r), ms(eager), ms(compiled), ratio(r, "speedup_vs_eager"),
            ratio(r, "speedup_vs_compile"), f"{r['gbs']:.0f}" if "gbs" in r else "-",
            "-" if frac is None else f"{100 * frac:.0f}%{'' if frac >= BANDWIDTH_TARGET else ' (<60%)'}",
            " / ".join(fmt_bytes(o.get("peak_bytes")) for o in (r, eager, compiled)),
        ])
    headers = ["op", "dtype", "BxHxWxC", "mode", "tile", "check", "triton", "eager", "compile", "vs eager",
               "vs compile", "GB/s", "of copy", "peak mem triton / eager / compile"]
    return format_table(headers, table)


def log_check(log: Log, result: dict[str, Any], what: str) -> None:
    log(f"[{'pass' if result['passed'] else 'FAIL'}] {what}: {result['detail']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (by the kernels)
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("No CUDA device: run this on a GPU, or pass --cpu-smoke for a tiny interpreter run.")
        return 2
    from mlla_fast.kernels import dwconv

    cases = args.cases or (SMOKE_CASES if args.cpu_smoke else GPU_CASES)
    check_cases = SMOKE_CHECK_CASES if args.cpu_smoke else GPU_CHECK_CASES
    large_case = SMOKE_LARGE_CASE if args.cpu_smoke else GPU_LARGE_CASE
    tiles = args.tile_elements or [dwconv.TILE_ELEMENTS]
    compile_backend = "aot_eager" if args.cpu_smoke else "inductor"
    baselines = [i for i in IMPLS if i != "triton" and not (args.no_compile and i == "compile")]

    env = environment(device)
    out = output_dir(args.out, env)
    log = Log()
    log(f"Fused depthwise-stencil kernels: check and timing | {env['label']}")
    log(describe_environment(env))
    log(f"bandwidth target: {100 * BANDWIDTH_TARGET:.0f}% of the copy bandwidth ({env['copy_bandwidth_gbs']} GB/s) "
        f"for the minimal bytes; tile sizes (elements): {tiles}, default {dwconv.TILE_ELEMENTS}")
    checks: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if out is None:
            return
        write_csv(out / "dwconv.csv", rows, env)
        write_json(out / "dwconv.json", {"benchmark": "dwconv", "env": env, "config": vars(args) | {"out": None},
                                         "checks": checks, "results": rows})
        (out / "dwconv.log").write_text("\n".join(log.lines) + "\n")

    for op in args.ops:
        result = check_compiled(op, device, args.seed, compile_backend)
        checks.append({"op": op, "case": "torch.compile fullgraph, 2x24x20x64 strided", **result})
        log_check(log, result, f"{op} under torch.compile")
        for B, H, W, C, strided in check_cases:
            for dtype_name in args.dtypes:
                result = check(op, DTYPES[dtype_name], (B, H, W, C), device, args.seed, strided)
                label = f"{B}x{H}x{W}x{C}{' strided' if strided else ''}"
                checks.append({"op": op, "dtype": dtype_name, "case": label, **result})
                log_check(log, result, f"{op} {dtype_name} {label}")
    save()

    for case in cases:
        label = "x".join(map(str, case))
        for op in args.ops:
            for dtype_name in args.dtypes:
                case_rows = []
                for tile in tiles:
                    with tile_elements(tile):
                        result = check(op, DTYPES[dtype_name], case, device, args.seed)
                        checks.append({"op": op, "dtype": dtype_name, "case": label, "tile_elements": tile, **result})
                        log_check(log, result, f"{op} {dtype_name} {label} tile {tile}")
                        free_memory(device)
                        for r in time_case(op, dtype_name, case, ["triton"], device, args.seed, compile_backend):
                            case_rows.append(r | {"tile_elements": tile,
                                                  "triton_check": "passed" if result["passed"] else "FAILED"})
                case_rows += time_case(op, dtype_name, case, baselines, device, args.seed, compile_backend)
                annotate(case_rows, env["copy_bandwidth_gbs"])
                rows.extend(case_rows)
                for r in case_rows:
                    if r["impl"] == "triton":
                        log(f"    {r['mode']:8s} triton tile {r['tile_elements']}: {fmt_ms(r.get('median_ms'))}"
                            + (f", {r['gbs']:.0f} GB/s ({100 * r.get('copy_fraction', 0):.0f}% of copy)"
                               if "gbs" in r else f" [{r.get('status')}; {r.get('note', '')}]"))
                save()

    for op in args.ops:
        result = check_large_offsets(op, large_case, device, args.seed)
        checks.append({"op": op, "dtype": "bf16", "case": "x".join(map(str, large_case)), **result})
        log_check(log, result, f"{op} 64-bit offsets")

    log()
    log(report(rows))
    failed = [c for c in checks if not c["passed"]]
    log(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
        + ("" if not failed else ": FAILED " + "; ".join(f"{c['op']} {c.get('dtype', '')} {c['case']}"
                                                           for c in failed)))
    if args.cpu_smoke:
        log("(CPU smoke run through the Triton interpreter: the times and bandwidths mean nothing)")
    if out is not None:
        log(f"wrote {out / 'dwconv.csv'}, {out / 'dwconv.json'}, {out / 'dwconv.log'}")
    save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
