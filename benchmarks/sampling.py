"""Check and time EDSM (PatchMerging), EUSM (PatchExpand) and the final x4 expand (``kernels/sampling.py``) on a GPU.

1. Correctness of the compiled kernels at real sizes: every stage's op of MLLA-UNet-T (C0 = 64) at
   224^2 batch 48 (the training configuration), 512^2 and 1024^2 batch 2. The composed op's output, input
   gradient, every parameter gradient and (training mode) the BatchNorm running statistics against the
   float64 reference op (``reference/ops.py``) under the test suite's rule (``tests/tolerance.py``):
   fp32 (TF32 off) relative error <= 1e-5; bf16 under autocast (fp32 parameters) at most twice the error
   of the reference op under the same autocast, plus a floor. BatchNorm in training mode; the 224^2 cases
   also in eval mode. (In training mode the gradient of the bias in front of BatchNorm cancels exactly,
   so it is checked in eval mode only.) Extra checks: each op inside ``torch.compile(fullgraph=True)``
   against eager, and each Triton op on tensors of more than 2^31 elements (last sample checked).
2. Timing, bf16 under autocast by default, BatchNorm in training mode: ``fwd`` and ``fwd+bwd`` of
   ``triton`` (the composed op), ``eager`` (the reference op) and ``compile`` (the reference op under
   ``torch.compile``, at the sizes of ``--compile-sizes``). Medians over repeats with fresh inputs and
   an L2 flush before each (``benchmarks/common.py``); compilation and warm-up come first. Peak memory:
   the allocator's peak during a call above what was allocated before it.
3. Bandwidth of each Triton kernel alone (its custom op: kernel, allocation and the partial sums), on the
   stage shapes, against the measured device copy bandwidth. Bytes it must move (s bytes per element,
   E channels, N input and M output tokens): stride-2 conv fwd (N + M)E s, bwd (2N + 2M)E s (reads
   dy, y, x, writes dx); transposed conv fwd (N + M)E s, bwd (M + 2N)E s; shuffle + LayerNorm over C
   fwd 2 M C s, bwd 3 M C s.
4. ``--tune``: first, a coordinate search over each kernel's ``LaunchConfig`` (``kernels/sampling.py``
   ``CONFIGS``) at the 224^2 stage-0 shapes; the best is used for the rest and printed, to be made the default.

No speedup or bandwidth is reported for a case whose check failed.
Prints a summary and writes ``sampling[-TAG].csv``, ``.json`` and ``.log`` to ``--out``'s card folder.

    python benchmarks/sampling.py --out "$OUT"                  # everything (several minutes)
    python benchmarks/sampling.py --sizes 224x48 --tag 224 --out "$OUT"             # or in two runs:
    python benchmarks/sampling.py --sizes 512x2 1024x2 --compile-sizes 512x2 1024x2 --no-extra-checks \
        --tag large --out "$OUT"
    python benchmarks/sampling.py --tune --sizes 224x48 --out "$OUT"  # tune the launch configurations first
    python benchmarks/sampling.py --cpu-smoke                   # tiny cases through the Triton interpreter
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the `benchmarks` folder importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the project's tolerance rule

from benchmarks.common import (
    TimingConfig,
    add_output_argument,
    autocast,
    describe_environment,
    describe_error,
    environment,
    fmt_bytes,
    fmt_ms,
    format_table,
    free_memory,
    is_oom,
    measure,
    no_tf32,
    output_dir,
    write_csv,
    write_json,
)
from mlla_fast.reference import ops
from mlla_fast.reference.ops import final_expand_ref, patch_expand_ref, patch_merging_ref
from mlla_fast.reference.sampling import FinalPatchExpand_X4, PatchExpand, PatchMerging

from tolerance import FP32_RTOL, LOWP_FACTOR, LOWP_FLOOR, rel_err

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
BANDWIDTH_TARGET = 0.6
C0 = 64  # MLLA-UNet-T
# name: (image side, batch); the smoke sizes run through the interpreter.
GPU_SIZES = {"224x48": (224, 48), "512x2": (512, 2), "1024x2": (1024, 2)}
SMOKE_SIZES = {"32x2": (32, 2)}
# Triton ops on more than 2^31 elements: (op, B, H, W, E) and CPU stand-ins.
GPU_WIDE = [("stride2", 129, 64, 64, 4096), ("transpose2x", 129, 32, 32, 4096), ("shuffle4_ln", 129, 32, 32, 1024)]
SMOKE_WIDE = [("stride2", 3, 5, 4, 64), ("transpose2x", 3, 3, 4, 64), ("shuffle4_ln", 3, 3, 2, 32)]
BIAS_BEFORE_BN = "d conv.2.conv.bias"  # its gradient cancels exactly in training mode
TUNE_KNOBS: list[dict[str, int]] = (
    [{"tile_elements": v} for v in (1024, 2048, 8192)] + [{"block_c": v} for v in (32, 128)]
    + [{"num_warps": v} for v in (2, 8)] + [{"programs_per_sm": v} for v in (4, 16)]
)


def kernels():
    """The kernel module, imported late: TRITON_INTERPRET must be set before triton is first imported."""
    from mlla_fast.kernels import sampling

    return sampling


@dataclasses.dataclass(frozen=True)
class Case:
    """One composed op at one stage of MLLA-UNet-T: x (B, H*W, C)."""

    op: str  # patch_merging, patch_expand, final_expand
    size: str
    B: int
    H: int
    W: int
    C: int

    @property
    def elements(self) -> int:
        return self.B * self.H * self.W * self.C

    @property
    def label(self) -> str:
        return f"{self.op} {self.B}x{self.H}x{self.W}x{self.C}"


def unet_cases(size: str, side: int, batch: int) -> list[Case]:
    """The stage shapes of MLLA-UNet-T at this image side: three PatchMerging, three PatchExpand (layers_up.0's
    and the two upsamples), the final expand."""
    g = side // 4
    cases = [Case("patch_merging", size, batch, g >> i, g >> i, C0 << i) for i in range(3)]
    cases += [Case("patch_expand", size, batch, g >> (3 - i), g >> (3 - i), C0 << (3 - i)) for i in range(3)]
    return [*cases, Case("final_expand", size, batch, g, g, C0)]


def make_module(case: Case, device: torch.device) -> nn.Module:
    cls = {"patch_merging": PatchMerging, "patch_expand": PatchExpand, "final_expand": FinalPatchExpand_X4}[case.op]
    return cls((case.H, case.W), case.C).to(device)


def out_shape(case: Case) -> tuple[int, int, int]:
    B, H, W, C = case.B, case.H, case.W, case.C
    if case.op == "patch_merging":
        return B, ((H + 1) // 2) * ((W + 1) // 2), 2 * C
    if case.op == "patch_expand":
        return B, 4 * H * W, C // 2
    return B, 16 * H * W, C


def op_fn(case: Case, impl: str) -> Callable[..., Tensor]:
    sampling = kernels()
    if impl == "triton":
        return {"patch_merging": sampling.patch_merging, "patch_expand": sampling.patch_expand,
                "final_expand": sampling.final_expand}[case.op]
    return {"patch_merging": patch_merging_ref, "patch_expand": patch_expand_ref,
            "final_expand": final_expand_ref}[case.op]


class Log:
    """print() that also keeps the lines for the log file."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)


# ----------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------


def run_op(fn: Callable[..., Tensor], module: nn.Module, x: Tensor, hw: tuple[int, int], grad: Tensor,
           dtype: torch.dtype) -> dict[str, Tensor]:
    """Output, input gradient, parameter gradients and buffers of fn on module's parameters, under autocast to
    dtype (none for float32)."""
    sampling = kernels()
    x = x.detach().clone().requires_grad_()
    params = dict(module.named_parameters())
    with autocast(x.device, dtype):
        y = fn(x, hw, *sampling.module_args(module))
    grads = torch.autograd.grad(y, [x, *params.values()], grad.to(y.dtype))
    results = {"y": y.detach(), "dx": grads[0]} | {f"d {k}": g for k, g in zip(params, grads[1:], strict=True)}
    return results | {k: b.detach().clone() for k, b in module.named_buffers() if b.is_floating_point()}


def judge(dtype: torch.dtype, got: dict[str, Tensor], ref: dict[str, Tensor],
          own: dict[str, Tensor] | None, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Errors of every result against float64, the rule's bounds, and the verdict."""
    errors, bounds = {}, {}
    for name in got:
        if name in skip:
            continue
        errors[name] = rel_err(got[name], ref[name])
        bounds[name] = FP32_RTOL if own is None else LOWP_FACTOR * rel_err(own[name], ref[name]) + LOWP_FLOOR[dtype]
    failed = [k for k in errors if not errors[k] <= bounds[k]]
    worst = max(errors, key=lambda k: errors[k] / bounds[k])
    detail = f"worst {worst} {errors[worst]:.1e} (bound {bounds[worst]:.1e})"
    if failed:
        detail = "FAILED " + ", ".join(f"{k} {errors[k]:.1e} > {bounds[k]:.1e}" for k in failed) + "; " + detail
    return {"passed": not failed, "detail": detail, "errors": errors, "bounds": bounds}


def check_case(case: Case, dtype: torch.dtype, train: bool, device: torch.device, seed: int) -> dict[str, Any]:
    """The composed op (dtype under autocast, fp32 parameters) against the float64 reference op."""
    torch.manual_seed(seed)
    module = make_module(case, device).train(train)
    x = torch.randn(case.B, case.H * case.W, case.C, device=device)
    grad = torch.randn(out_shape(case), device=device)
    hw = (case.H, case.W)
    with no_tf32():
        got = run_op(op_fn(case, "triton"), copy.deepcopy(module), x, hw, grad, dtype)
        ref = run_op(op_fn(case, "eager"), copy.deepcopy(module).double(), x.double(), hw, grad.double(),
                     torch.float32)  # float64 tensors, no autocast
        own = None
        if dtype != torch.float32:
            own = run_op(op_fn(case, "eager"), copy.deepcopy(module), x, hw, grad, dtype)
    skip = [BIAS_BEFORE_BN] if train and case.op != "final_expand" else []
    return judge(dtype, got, ref, own, skip)


def check_compiled(case: Case, device: torch.device, backend: str, seed: int) -> dict[str, Any]:
    """The composed op inside torch.compile(fullgraph=True) gives what it gives eagerly (fp32, training mode)."""
    torch.manual_seed(seed)
    module = make_module(case, device).train()
    x = torch.randn(case.B, case.H * case.W, case.C, device=device)
    grad = torch.randn(out_shape(case), device=device)
    hw = (case.H, case.W)
    fn = op_fn(case, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    with no_tf32():
        got = run_op(compiled, copy.deepcopy(module), x, hw, grad, torch.float32)
        eager = run_op(fn, copy.deepcopy(module), x, hw, grad, torch.float32)
    errors = {k: rel_err(got[k], eager[k]) for k in got}
    worst = max(errors.values())
    return {"passed": worst <= FP32_RTOL, "detail": f"largest relative difference to eager {worst:.1e} "
                                                    f"(<= {FP32_RTOL:.0e})", "errors": errors}


def stencil_call(op: str, x: Tensor, params: list[Tensor], hw: tuple[int, int], reference: bool) -> Tensor:
    """One Triton op (or its reference) as the composed ops call it (input ReLU fused)."""
    sampling = kernels()
    if op == "stride2":
        fn = ops.dwconv_stride2_relu_ref if reference else sampling.dwconv_stride2_relu
        return fn(x, params[0], params[1], hw, input_relu=True)
    if op == "transpose2x":
        fn = ops.dwconv_transpose2x_ref if reference else sampling.dwconv_transpose2x
        return fn(x, params[0], hw, input_relu=True)
    fn = ops.pixel_shuffle4_layernorm_ref if reference else sampling.pixel_shuffle4_layernorm
    return fn(x, hw, params[0], params[1], 1e-5)


def check_wide(spec: tuple[str, int, int, int, int], device: torch.device, seed: int) -> dict[str, Any]:
    """bf16 Triton op with a tensor beyond 2^31 elements: the last sample's output and input gradient."""
    op, B, H, W, E = spec
    gen = torch.Generator(device=device).manual_seed(seed)
    channels = 16 * E if op == "shuffle4_ln" else E
    x = torch.randn(B, H * W, channels, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    if op == "shuffle4_ln":
        params = [1 + 0.3 * torch.randn(E, device=device, generator=gen), torch.randn(E, device=device, generator=gen)]
    else:
        params = [0.3 * torch.randn(E, 1, 3, 3, device=device, generator=gen)]
        params += [torch.randn(E, device=device, generator=gen)] if op == "stride2" else []
    y = stencil_call(op, x, params, (H, W), reference=False)
    elements = max(x.numel(), y.numel())
    dy = torch.randn(y.shape, device=device, dtype=torch.bfloat16, generator=gen)
    (dx,) = torch.autograd.grad(y, x, dy)
    got = {"y": y[-1:].detach(), "dx": dx[-1:]}
    last, dy_last = x.detach()[-1:], dy[-1:]
    del x, y, dy, dx
    free_memory(device)

    def reference(dtype: torch.dtype) -> dict[str, Tensor]:
        leaf = last.to(dtype).requires_grad_()
        out = stencil_call(op, leaf, [p.to(dtype) for p in params], (H, W), reference=True)
        return {"y": out.detach(), "dx": torch.autograd.grad(out, leaf, dy_last.to(dtype))[0]}

    result = judge(torch.bfloat16, got, reference(torch.float64), reference(torch.bfloat16))
    result["detail"] += f"; largest tensor {elements / 2**31:.2f} x 2^31 elements"
    return result


def guarded(check: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run a check; an OOM or an error fails it with the reason instead of ending the run."""
    try:
        result = check()
    except Exception as exc:
        result = {"passed": False, "detail": ("out of memory: " if is_oom(exc) else "error: ") + describe_error(exc)}
    free_memory(device)
    return result


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


class Runner:
    """One implementation of a case, built once for both timed modes (so a compiled baseline compiles once):
    the op in training mode with fp32 parameters, autocast to dtype."""

    def __init__(self, case: Case, impl: str, dtype: torch.dtype, device: torch.device, backend: str) -> None:
        self.case, self.dtype, self.device = case, dtype, device
        self.module = make_module(case, device).train()
        self.args = kernels().module_args(self.module)
        self.fn = op_fn(case, impl)
        if impl == "compile":
            torch._dynamo.reset()
            self.fn = torch.compile(self.fn, backend=backend, dynamic=False)

    def build(self, mode: str):
        """A ``common.measure`` build: ``setup`` makes fresh inputs and clears the parameter gradients."""
        case, dtype, device = self.case, self.dtype, self.device
        hw = (case.H, case.W)
        params = list(self.module.parameters())

        def setup():
            for p in params:
                p.grad = None
            x = torch.randn(case.B, case.H * case.W, case.C, device=device).to(dtype).requires_grad_()
            return x, torch.randn(out_shape(case), device=device, dtype=dtype)

        def step(x: Tensor, grad: Tensor) -> None:
            with autocast(device, dtype):
                y = self.fn(x, hw, *self.args)
            if mode == "fwd+bwd":
                y.backward(grad)

        return lambda: (step, setup)


def stencil_shapes(case: Case) -> tuple[str, int, int, int, int]:
    """The Triton op inside a composed op: (op, B, H, W, channels it runs on)."""
    if case.op == "patch_merging":
        return "stride2", case.B, case.H, case.W, 8 * case.C
    if case.op == "patch_expand":
        return "transpose2x", case.B, case.H, case.W, 4 * case.C
    return "shuffle4_ln", case.B, case.H, case.W, case.C


def stencil_bytes(op: str, mode: str, B: int, H: int, W: int, E: int, itemsize: int) -> int:
    """Bytes one call must move (see the module docstring)."""
    n = B * H * W
    if op == "stride2":
        m = B * ((H + 1) // 2) * ((W + 1) // 2)
        elements = (n + m) if mode == "fwd" else 2 * (n + m)
    elif op == "transpose2x":
        elements = 5 * n if mode == "fwd" else 6 * n
    else:
        elements = 16 * n * (2 if mode == "fwd" else 3)
    return elements * E * itemsize


def stencil_build(op: str, mode: str, B: int, H: int, W: int, E: int, dtype: torch.dtype, device: torch.device):
    """A ``common.measure`` build calling one custom op (forward or backward kernel) on fresh bf16 inputs."""

    def build():
        ops = torch.ops.mlla_fast
        n, m = B * H * W, 0
        w = 0.3 * torch.randn(E, 1, 3, 3, device=device)
        b = torch.randn(E, device=device)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, device=device, dtype=dtype)

        if op == "stride2":
            m = B * ((H + 1) // 2) * ((W + 1) // 2)
            if mode == "fwd":
                return (lambda x: ops.dwconv_stride2_relu_fwd(x, w, b, H, W, True)), lambda: (randn(B, n // B, E),)
            return (lambda g, x, y: ops.dwconv_stride2_relu_bwd(g, x, w, y, H, W, True),
                    lambda: (randn(B, m // B, E), randn(B, n // B, E), randn(B, m // B, E)))
        if op == "transpose2x":
            if mode == "fwd":
                return (lambda x: ops.dwconv_transpose2x_fwd(x, w, H, W, True)), lambda: (randn(B, n // B, E),)
            return (lambda g, x: ops.dwconv_transpose2x_bwd(g, x, w, H, W, True),
                    lambda: (randn(B, 4 * n // B, E), randn(B, n // B, E)))
        nw, nb = 1 + 0.3 * torch.randn(E, device=device), torch.randn(E, device=device)
        if mode == "fwd":
            return (lambda y: ops.pixel_shuffle4_layernorm_fwd(y, nw, nb, H, W, 1e-5, False),
                    lambda: (randn(B, H * W, 16 * E),))
        return (lambda g, y: ops.pixel_shuffle4_layernorm_bwd(g, y, nw, H, W, 1e-5),
                lambda: (randn(B, 16 * H * W, E), randn(B, H * W, 16 * E)))

    return build


def profile_breakdown(case: Case, dtype: torch.dtype, device: torch.device) -> str:
    """CUDA time per kernel of one fused fwd+bwd, from the profiler."""
    if device.type != "cuda":
        return "(no CUDA profiler on the CPU)"
    step, setup = Runner(case, "triton", dtype, device, "inductor").build("fwd+bwd")()
    step(*setup())
    torch.cuda.synchronize(device)
    args = setup()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step(*args)
        torch.cuda.synchronize(device)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if us:
            totals[event.key] = totals.get(event.key, 0.0) + us
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:8]
    return ", ".join(f"{name[:48]} {us / 1e3:.3f} ms" for name, us in top)


KERNEL_OF = {("stride2", "fwd"): "stride2_fwd", ("stride2", "fwd+bwd"): "stride2_bwd",
             ("transpose2x", "fwd"): "transpose2x_fwd", ("transpose2x", "fwd+bwd"): "transpose2x_bwd",
             ("shuffle4_ln", "fwd"): "shuffle4_ln_fwd", ("shuffle4_ln", "fwd+bwd"): "shuffle4_ln_bwd"}


def tune(cases: Sequence[Case], dtype: torch.dtype, device: torch.device, timing: TimingConfig, log: Log) -> None:
    """Coordinate search over each kernel's LaunchConfig at the first case of each op; sets the best in CONFIGS."""
    sampling = kernels()
    for case in cases:
        op, B, H, W, E = stencil_shapes(case)
        for mode in MODES:
            key = KERNEL_OF[(op, mode)]
            best = sampling.CONFIGS[key]
            best_ms = measure(stencil_build(op, mode, B, H, W, E, dtype, device), device, timing).median_ms
            log(f"  tune {key} at {B}x{H}x{W}x{E}: default {fmt_ms(best_ms)}")
            for knob in TUNE_KNOBS:
                if "programs_per_sm" in knob and mode == "fwd":
                    continue
                sampling.CONFIGS[key] = candidate = dataclasses.replace(best, **knob)
                m = measure(stencil_build(op, mode, B, H, W, E, dtype, device), device, timing)
                if m.ok and (best_ms is None or m.median_ms < best_ms):
                    best, best_ms = candidate, m.median_ms
                log(f"    {knob}: {fmt_ms(m.median_ms) if m.ok else m.status + ' ' + m.note}")
            sampling.CONFIGS[key] = best
            log(f"  best {key}: {best} ({fmt_ms(best_ms)})")


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run tiny cases through the Triton interpreter on the CPU (numbers mean nothing)")
    parser.add_argument("--sizes", nargs="+", choices=list(GPU_SIZES), default=list(GPU_SIZES),
                        help="image side x batch of the checked and timed stage shapes (default: all)")
    parser.add_argument("--compile-sizes", nargs="*", choices=list(GPU_SIZES), default=["224x48"],
                        help="sizes at which the torch.compile baseline is timed (default: 224x48; each case "
                             "compiles once)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"], help="timed dtypes")
    parser.add_argument("--tune", action="store_true", help="search the launch configurations first")
    parser.add_argument("--no-extra-checks", action="store_true",
                        help="skip the compile, eval-mode and > 2^31-element checks (timed cases are still checked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the output files (sampling-TAG.csv ...), to keep the "
                                                  "results of runs over different sizes apart")
    add_output_argument(parser)
    return parser.parse_args(argv)


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
    sampling = kernels()
    smoke = args.cpu_smoke
    sizes = SMOKE_SIZES if smoke else {k: GPU_SIZES[k] for k in args.sizes}
    compile_sizes = set(SMOKE_SIZES) if smoke else set(args.compile_sizes)
    backend = "aot_eager" if smoke else "inductor"
    timing = (TimingConfig(budget_s=60.0, target_s=0.1, min_repeats=1, max_repeats=1) if smoke
              else TimingConfig(budget_s=10.0, target_s=0.5, min_repeats=5, max_repeats=50, warmup=3))

    env = environment(device)
    out = output_dir(args.out, env)
    log = Log()
    log(f"EDSM / EUSM / final x4 expand: check and timing | {env['label']}")
    log(describe_environment(env))
    checks: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []

    stem = "sampling" + (f"-{args.tag}" if args.tag else "")

    def save() -> None:
        if out is None:
            return
        write_csv(out / f"{stem}.csv", rows, env)
        write_json(out / f"{stem}.json", {"benchmark": "sampling", "env": env, "args": vars(args) | {"out": None},
                                           "configs": {k: dataclasses.asdict(v) for k, v in sampling.CONFIGS.items()},
                                           "checks": checks, "results": rows})
        (out / f"{stem}.log").write_text("\n".join(log.lines) + "\n")

    def record(name: str, result: dict[str, Any]) -> bool:
        checks.append({"case": name, **result})
        log(f"[{'pass' if result['passed'] else 'FAIL'}] {name}: {result['detail']}")
        save()
        return result["passed"]

    cases = [c for size, (side, batch) in sizes.items() for c in unet_cases(size, side, batch)]
    first_size = next(iter(sizes))
    largest: dict[str, Case] = {}  # per op, its largest stage at the first size: tuned and profiled
    for c in cases:
        if c.size == first_size and (c.op not in largest or c.elements > largest[c.op].elements):
            largest[c.op] = c
    timed = set(largest.values()) if smoke else set(cases)  # the interpreter is slow: one case per op
    if args.tune:
        log("tuning the launch configurations (bf16):")
        tune(list(largest.values()), torch.bfloat16, device, timing, log)
    log("launch configurations: " + ", ".join(f"{k}={v}" for k, v in sampling.CONFIGS.items()))

    if not args.no_extra_checks:
        for op in ("patch_merging", "patch_expand", "final_expand"):
            case = Case(op, "compile", 2, 12, 10, 64)
            record(f"torch.compile(fullgraph=True) vs eager: {case.label}",
                   guarded(lambda case=case: check_compiled(case, device, backend, args.seed), device))
        for spec in SMOKE_WIDE if smoke else GPU_WIDE:
            record(f"bf16 {spec[0]} {'x'.join(map(str, spec[1:]))} (last sample)",
                   guarded(lambda spec=spec: check_wide(spec, device, args.seed), device))

    copy_gbs = env["copy_bandwidth_gbs"]
    for case in cases:
        passed = True
        modes = [("fp32", torch.float32, True), ("bf16", torch.bfloat16, True)]
        if not args.no_extra_checks and case.size == first_size:
            modes.append(("fp32", torch.float32, False))
        for name, dtype, train in modes:
            passed &= record(f"{name} {'train' if train else 'eval'} {case.size} {case.label}",
                             guarded(lambda case=case, dtype=dtype, train=train: check_case(case, dtype, train, device,
                                                                                            args.seed), device))
        for dtype_name in args.dtypes if case in timed else ():
            dtype = DTYPES[dtype_name]
            by_mode: dict[str, dict[str, Any]] = {}
            for impl in IMPLS:
                if impl == "compile" and case.size not in compile_sizes:
                    continue
                try:
                    runner = Runner(case, impl, dtype, device, backend)
                except Exception as exc:
                    log(f"    {impl}: {describe_error(exc)}")
                    continue
                for mode in MODES:
                    m = measure(runner.build(mode), device, timing)
                    row = {"kind": "composed", "size": case.size, "op": case.op, "B": case.B, "H": case.H,
                           "W": case.W, "C": case.C, "dtype": dtype_name, "impl": impl, "mode": mode,
                           "check": "passed" if passed else "FAILED"} | m.as_dict()
                    rows.append(row)
                    by_mode.setdefault(mode, {})[impl] = row
                del runner
                free_memory(device)
            for impls in by_mode.values():
                tri = impls.get("triton")
                for other in ("eager", "compile"):
                    if passed and tri and tri["status"] == "ok" and impls.get(other, {}).get("status") == "ok":
                        tri[f"speedup_vs_{other}"] = impls[other]["median_ms"] / tri["median_ms"]
            op, B, H, W, E = stencil_shapes(case)
            for mode in MODES:
                m = measure(stencil_build(op, mode, B, H, W, E, dtype, device), device, timing)
                row = {"kind": "kernel", "size": case.size, "op": KERNEL_OF[(op, mode)], "B": B, "H": H, "W": W,
                       "C": E, "dtype": dtype_name, "impl": "triton", "mode": mode,
                       "check": "passed" if passed else "FAILED",
                       "min_bytes": stencil_bytes(op, mode, B, H, W, E, dtype.itemsize)} | m.as_dict()
                if passed and m.ok:
                    row["gbs"] = row["min_bytes"] / (m.median_ms * 1e-3) / 1e9
                    row["copy_fraction"] = row["gbs"] / copy_gbs if copy_gbs else None
                rows.append(row)
            save()
        if case in largest.values():
            try:
                log(f"    per kernel, bf16 {case.label} fwd+bwd: {profile_breakdown(case, torch.bfloat16, device)}")
            except Exception as exc:
                log(f"    per kernel: {describe_error(exc)}")
            free_memory(device)

    log()
    log(report(rows))
    failed = [c for c in checks if not c["passed"]]
    log(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed"
        + ("" if not failed else ": FAILED " + "; ".join(c["case"] for c in failed)))
    if smoke:
        log("(CPU smoke run through the Triton interpreter: the times and bandwidths mean nothing)")
    if out is not None:
        log(f"wrote {out / stem}.csv, .json and .log")
    save()
    return 1 if failed else 0


def report(rows: list[dict[str, Any]]) -> str:
    """Two tables: the composed ops against eager and compile, and the kernels' bandwidth."""
    keyed = {(r["size"], r["op"], r["C"], r["dtype"], r["mode"], r["impl"]): r for r in rows if r["kind"] == "composed"}

    def ms(row: dict[str, Any] | None) -> str:
        if not row:
            return "-"
        return fmt_ms(row["median_ms"]) if row["status"] == "ok" else row["status"]

    composed = []
    for r in rows:
        if r["kind"] != "composed" or r["impl"] != "triton":
            continue
        key = (r["size"], r["op"], r["C"], r["dtype"], r["mode"])
        eager, comp = keyed.get((*key, "eager")), keyed.get((*key, "compile"))
        composed.append([
            r["size"], r["op"], f"{r['B']}x{r['H']}x{r['W']}x{r['C']}", r["dtype"], r["mode"], r["check"], ms(r),
            ms(eager), ms(comp),
            f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-",
            f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else "-",
            " / ".join(fmt_bytes(o.get("work_bytes")) if o else "-" for o in (r, eager, comp)),
        ])
    kernels_table = []
    for r in rows:
        if r["kind"] != "kernel":
            continue
        frac = r.get("copy_fraction")
        kernels_table.append([
            r["size"], r["op"], f"{r['B']}x{r['H']}x{r['W']}x{r['C']}", r["dtype"], r["check"], ms(r),
            f"{r['gbs']:.0f}" if "gbs" in r else "-",
            "-" if frac is None else f"{100 * frac:.0f}%{'' if frac >= BANDWIDTH_TARGET else ' (<60%)'}",
        ])
    return (format_table(["size", "op", "BxHxWxC", "dtype", "mode", "check", "triton", "eager", "compile",
                          "vs eager", "vs compile", "work mem triton / eager / compile"], composed)
            + "\n\n" + format_table(["size", "kernel", "BxHxWxE", "dtype", "check", "time", "GB/s", "of copy"],
                                    kernels_table))


if __name__ == "__main__":
    sys.exit(main())
