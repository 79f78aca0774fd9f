"""Registers, spills and shared memory of the linear attention's kernels, compiled offline (no GPU needed).

Runs the real launchers (``_linear_attention_fwd`` and ``_linear_attention_bwd`` of
``kernels/linear_attention.py``) on meta tensors of the given shape with every Triton launch intercepted,
so each kernel is compiled with exactly the arguments, constexprs and warps the launcher passes, specialised
the way Triton's JIT specialises them (integers equal to 1 become constants, multiples of 16 get the
divisibility hint, tensors are taken as 16-byte aligned, as real allocations are). Each launch is then
compiled afresh for sm_<arch> with Triton's CUDA backend, and the log of Triton's own ``ptxas -v`` run (the
ptxas it bundles) gives registers per thread, spill store/load bytes and stack bytes (32 of them are
libdevice's cos/sin slow path, not spilling); shared memory (bytes per program) is Triton's own figure.
It uses Triton internals (the JIT's binder, ``_pack_args``, ``knobs``) as of Triton 3.9.

The numbers are those of the local Triton and ptxas, not of the GPU's install: indicative, to compare
kernel variants before spending GPU time (``attention.py --resource-usage`` sweeps the tuner's block and
warp choices instead). The SM count (which sets the token splits of the looping
kernels, hence ``blocks_per_split``) is taken as --sms.

    python benchmarks/kernel_registers.py                       # C=64, 2 x 1024^2, bf16 and fp32, gated
    python benchmarks/kernel_registers.py --dtype bf16 --hw 512 512 --no-gate
    python benchmarks/kernel_registers.py --config lowp_dot_precision=lowp-operands   # a CONFIG override
    python benchmarks/kernel_registers.py --sass      # plus static SASS instruction counts per opcode group
    python benchmarks/kernel_registers.py --stencils --recompute-gate   # plus the block's stencils, the gate pass
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

DTYPES = ("bf16", "fp32", "fp16")


def record_launches(run, modules) -> list[tuple[object, tuple, dict]]:
    """Call run() with every Triton JIT function of the modules replaced by a recorder; returns the launches
    (kernel, positional args, keyword args) in order. The kernels are put back afterwards."""
    import triton

    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    saved = []
    for module in modules:
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.JITFunction):
                saved.append((module, name, value))
    try:
        for module, name, value in saved:
            setattr(module, name, Recorder(value))
        run()
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
    return launches


def compile_launch(fn, args: tuple, kwargs: dict, arch: int):
    """Compile one recorded launch for sm_<arch> with the JIT's own argument specialisation; returns the
    compiled kernel and the log of Triton's own ptxas -v run (always compiled afresh, never from the cache)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=target, options=options.__dict__)
    return compiled, log.getvalue()


def ptxas_usage(log: str) -> dict[str, int]:
    """Registers, spill store/load bytes and stack bytes per thread from a ptxas -v log."""

    def field(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"regs": field(r"Used (\d+) registers"), "spill_st": field(r"(\d+) bytes spill stores"),
            "spill_ld": field(r"(\d+) bytes spill loads"), "stack": field(r"(\d+) bytes stack frame")}


# SASS opcode groups counted by --sass (prefix match on the opcode)
SASS_GROUPS = {
    "int": ("IMAD", "IADD3", "LEA", "ISETP", "SEL", "LOP3", "SHF", "IABS", "PRMT"),
    "fp": ("FADD", "FMUL", "FFMA", "FSETP", "FSEL", "FMNMX", "MUFU", "F2F", "F2FP", "HFMA2", "HADD2", "HMUL2"),
    "mma": ("HMMA", "HGMMA", "IMMA"),
    "ldg": ("LDG",),
    "stg": ("STG",),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "bar": ("BAR",),
}


def sass_counts(cubin: bytes) -> dict[str, int]:
    """Static SASS instruction counts of a cubin (Triton's bundled cuobjdump): the total and per SASS_GROUPS.
    Static counts, not executed ones: a loop body counts once."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    opcodes = [op for op in opcodes if op != "NOP"]
    counts = {"sass": len(opcodes)}
    for group, prefixes in SASS_GROUPS.items():
        counts[group] = sum(1 for op in opcodes if op.startswith(prefixes))
    return counts


def attention_launches(B: int, H: int, W: int, C: int, dtype_name: str, gate: bool, sms: int, config=None,
                       projected: bool = False, save_output: bool = True):
    """The kernel launches of the attention's forward and backward at this shape (meta tensors), under config
    (default: ``linear_attention.CONFIG``); projected: the forward's reduction once more with k computed inside
    it from v (``linear_attention.Projected``, as ``mlla_fast.attention`` launches it for a large v);
    save_output: a gated forward keeps its pre-gate output for the backward's element-wise gate pass, as
    ``mlla_fast.attention.SAVE_ATTENTION_OUTPUT`` does by default (otherwise the backward runs the output pass
    again, ``GATE_GRAD``)."""
    import torch

    from mlla_fast.kernels import linear_attention as la

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    meta = torch.device("meta")
    N = H * W
    qk = torch.empty(B, N, 2 * C, dtype=dtype, device=meta)
    v = torch.empty(B, N, C, dtype=dtype, device=meta)
    g = torch.empty(B, N, C, dtype=dtype, device=meta) if gate else None
    o = torch.empty(B, N, C, dtype=dtype, device=meta) if gate and save_output else None
    weight = torch.empty(C, 1, 3, 3, device=meta)
    bias = torch.empty(C, device=meta)
    kv = torch.empty(B * C // 32, 32, 32, device=meta)
    ksum = torch.empty(B * C // 32, 32, device=meta)

    def run():
        if projected:
            w_k = torch.empty(C, C, dtype=dtype, device=meta)
            la.attention_state(la.Projected(v, w_k, torch.empty(C, dtype=dtype, device=meta)), v, W, C // 32)
        la._linear_attention_fwd(qk, v, g, weight, bias, H, W, C // 32, False, o=o)
        la._linear_attention_bwd(torch.empty_like(v), qk, v, g, weight, bias, kv, ksum, H, W, C // 32, False, o=o)

    return _record(run, sms, config)


def stencil_launches(B: int, H: int, W: int, C: int, dtype_name: str, sms: int):
    """The launches of the block's depthwise stencils that walk rows (``kernels/dwconv.py``'s
    ``_stencil_walk_kernel``) at this shape (meta tensors): cpe + residual + LayerNorm with a residual bias scaled
    per sample, dwconv + SiLU, and the transposed stencil of the backward."""
    import torch

    from mlla_fast.kernels import dwconv

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    meta = torch.device("meta")
    x = torch.empty(B, H * W, C, dtype=dtype, device=meta)
    weight, vec = torch.empty(C, 1, 3, 3, device=meta), torch.empty(C, device=meta)
    scale = torch.empty(B, device=meta)

    def run():
        dwconv.cpe_residual_norm_fwd(x, weight, vec, vec, vec, (H, W), 1e-5, vec, scale)
        dwconv.dwconv_silu_fwd(x, weight, vec, (H, W))
        dwconv._dwconv_transpose(x, weight, (H, W), residual=True)

    saved = dwconv.fused_supported
    try:
        dwconv.fused_supported = lambda t: None  # meta tensors stand in for CUDA ones
        return _record(run, sms)
    finally:
        dwconv.fused_supported = saved


def _record(run, sms: int, config=None) -> list[tuple[object, tuple, dict]]:
    """record_launches of run over the attention and dwconv kernels, with sms SMs and the attention under config
    (default: ``linear_attention.CONFIG``)."""
    from mlla_fast.kernels import dwconv
    from mlla_fast.kernels import linear_attention as la

    patched = [(module, module.multiprocessors) for module in (la, dwconv)]
    saved_config = la.CONFIG
    try:
        for module, _ in patched:
            module.multiprocessors = lambda device: sms
        la.CONFIG = config or saved_config
        return record_launches(run, (la, dwconv))
    finally:
        la.CONFIG = saved_config
        for module, original in patched:
            module.multiprocessors = original


def _variant(kwargs: dict) -> str:
    """A launch's label in the table: the constexprs that tell its specialisations apart."""
    if kwargs.get("GATE_GRAD"):
        return "GATE_GRAD"
    if kwargs.get("PROJECT"):
        return "PROJECT"
    if kwargs.get("WRITE_O"):
        return "WRITE_O"
    if "KIND" in kwargs:
        return f"KIND {int(kwargs['KIND'])}"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hw", type=int, nargs=2, default=[1024, 1024], metavar=("H", "W"))
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--no-gate", action="store_true", help="launch without a gate (no GATE_GRAD pass)")
    parser.add_argument("--projected", action="store_true", help="also the reduction projecting k itself")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    parser.add_argument("--sms", type=int, default=132, help="SM count assumed by the launchers' token splits")
    parser.add_argument("--all", action="store_true", help="also the dwconv kernels the attention launches")
    parser.add_argument("--stencils", action="store_true",
                        help="also the block's depthwise stencils that walk rows (cpe + LayerNorm, SiLU, transposed)")
    parser.add_argument("--recompute-gate", action="store_true",
                        help="also the backward's gate pass as the output pass again (GATE_GRAD), which it is "
                             "without the saved pre-gate output")
    parser.add_argument("--sass", action="store_true",
                        help="also count SASS instructions (static, per opcode group) with the bundled cuobjdump")
    parser.add_argument("--config", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override fields of linear_attention.CONFIG, e.g. lowp_dot_precision=lowp-operands")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_registers.py compiles real kernels: unset TRITON_INTERPRET.")
        return 2
    import triton

    from mlla_fast.kernels import linear_attention as la

    try:
        config = la.CONFIG.with_overrides(args.config)
    except ValueError as exc:
        raise SystemExit(f"--config: {exc}") from exc
    print(f"Triton {triton.__version__}, sm_{args.arch}a, C={args.channels}, B={args.batch}, grid "
          f"{args.hw[0]}x{args.hw[1]}, {'no gate' if args.no_gate else 'gated'}"
          f"{', plus the k-projecting reduction' if args.projected else ''}, {args.sms} SMs "
          "(offline compilation; GPU builds with another Triton may differ)")
    print(f"config: {', '.join(args.config) if args.config else 'default'}")
    print(f"{'dtype':5s} {'kernel':28s} {'variant':12s} {'block':>5s} {'warps':>5s} {'regs':>4s} "
          f"{'spill st/ld':>11s} {'stack':>5s} {'shared':>7s}"
          + ("".join(f" {k:>6s}" for k in ("sass", *SASS_GROUPS)) if args.sass else ""))
    seen = set()
    for dtype_name in args.dtype:
        launches = attention_launches(args.batch, *args.hw, args.channels, dtype_name, not args.no_gate, args.sms,
                                      config, projected=args.projected)
        if args.recompute_gate:
            launches += attention_launches(args.batch, *args.hw, args.channels, dtype_name, not args.no_gate,
                                           args.sms, config, save_output=False)
        launches = [launch for launch in launches if args.all or launch[0].__name__.startswith("_la_")]
        if args.stencils:
            launches += stencil_launches(args.batch, *args.hw, args.channels, dtype_name, args.sms)
        for fn, call_args, kwargs in launches:
            name = fn.__name__
            variant = _variant(kwargs)
            key = (dtype_name, name, variant)
            if key in seen:
                continue
            seen.add(key)
            compiled, log = compile_launch(fn, call_args, kwargs, args.arch)
            usage = ptxas_usage(log)
            block = kwargs.get("BLOCK_N", "")
            print(f"{dtype_name:5s} {name:28s} {variant:12s} {block!s:>5s} {compiled.metadata.num_warps:5d} "
                  f"{usage['regs']:4d} {usage['spill_st']:5d}/{usage['spill_ld']:<5d} {usage['stack']:5d} "
                  f"{compiled.metadata.shared:7d}"
                  + ("".join(f" {n:6d}" for n in sass_counts(compiled.asm["cubin"]).values()) if args.sass else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
