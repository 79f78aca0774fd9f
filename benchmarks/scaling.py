"""Linear scaling of one MLLA block to high resolution: time and peak memory from 64² to 4096² pixels.

Variants, all with the same weights (loaded with ``load_state_dict``):

- ``fused``: ``mlla_fast.MLLABlock(..., backend="triton")``, reported only if this run's quick
  correctness check against the reference passes (else "failed-check");
- ``eager``: the pure-PyTorch reference ``mlla_fast.reference.MLLABlock``;
- ``compiled``: the reference under ``torch.compile`` (static shapes, recompiled per grid; the
  compile time is the ``first_call_s`` column);
- ``fused-graph`` / ``eager-graph``: the fused block and the reference with each call (forward, or
  forward and backward into the input and every parameter) captured in one CUDA graph by
  ``mlla_fast.graphs.GraphedStep`` and replayed: the GPU time without Python and kernel-launch overhead,
  which bounds a 512² block of C=64; their peak memory is the larger of the replays' and that of the
  warm-up and capture;
- ``softmax``: the same block with softmax attention (``F.scaled_dot_product_attention`` over heads
  of 32 channels: q, k from the block's ``qk`` projection, v the attention input) in place of the
  linear attention, then + LePE and gated like the block: the quadratic baseline. On CUDA its first
  call tries SDPA's kernels one at a time, flash, memory-efficient, cuDNN, then math, and keeps the
  first that accepts the inputs; the row's note names it and why the ones before it were refused
  (the math kernel holds the N x N attention matrix: quadratic memory as well as time).

Modes: ``fwd`` (inference, under ``torch.no_grad``) and ``fwd+bwd`` (forward, then backward of a
random output gradient into the input and every parameter). bf16 means autocast to bf16 with a bf16
block input and fp32 weights, as in mixed-precision training.

Prints a table, fits the log-log slope of time and of peak memory against pixel count over the sizes
>= --fit-min² (above the launch-bound regime), and writes CSV + JSON + a PNG plot to
``benchmarks/results/<card>/``. Without a GPU it runs a tiny CPU demonstration of the reference.

    python benchmarks/scaling.py                                    # the full default run (GPU)
    python benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --variants fused eager compiled
    python benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --variants fused-graph eager-graph
    python benchmarks/scaling.py --from-json benchmarks/results/nvidia-h200/scaling_C64_h2_B1_bf16.json  # refit
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

if __package__ in (None, ""):  # run as a script: make the `benchmarks` folder importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlla_fast
from benchmarks.common import (
    CPU_DEMO_LABEL,
    DTYPES,
    FAILED_CHECK,
    SKIPPED,
    CheckResult,
    Measurement,
    TimingConfig,
    add_output_argument,
    add_timing_arguments,
    autocast,
    check_batches,
    default_device,
    describe_environment,
    describe_error,
    describe_measurement,
    environment,
    fit_loglog_slope,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    format_table,
    git_state,
    graphed_on_first_call,
    measure,
    output_dir,
    release_compiled,
    sweep,
    timing_from_args,
    with_capture_peak,
    write_csv,
    write_json,
)
from mlla_fast.reference import MLLABlock as ReferenceBlock
from mlla_fast.reference.block import LinearAttention
from mlla_fast.reference.ops import dwconv_tokens_ref, trunc_normal_init

VARIANTS = ("fused", "eager", "compiled", "softmax", "fused-graph", "eager-graph")
GRAPH_VARIANTS = ("fused-graph", "eager-graph")
MODES = ("fwd", "fwd+bwd")
GPU_GRIDS = ("64", "128", "256", "512", "1024", "2048", "4096")
CPU_GRIDS = ("16", "32", "64")
ROPE_KEY = "attn.rope.rotations"
SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH)
NO_GPU_MESSAGE = (
    "No CUDA device found: running a tiny CPU demonstration of the reference only "
    f"({CPU_DEMO_LABEL}). Run this script on an NVIDIA GPU for the real measurements."
)


class SoftmaxAttention(nn.Module):
    """Softmax attention in place of MLLA's linear attention, reusing its ``qk`` and ``lepe``.

    forward(v, hw, gate): q, k = split(qk(v)); per head of d channels ``SDPA(q, k, v)`` (scale d^-½,
    no RoPE, no feature map); merge heads, + lepe(v), times gate. v (B, N, C) -> (B, N, C).
    ``sdpa_note`` says which SDPA kernel ran (see ``_sdpa``).
    """

    def __init__(self, attn: LinearAttention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.qk = attn.qk
        self.lepe = attn.lepe
        self.sdpa_backend = None
        self.sdpa_note = ""

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """SDPA on the kernel chosen at the first call: on CUDA the first of SDPA_BACKENDS that accepts
        these inputs (each refusal's reason, from SDPA's warnings, goes into ``sdpa_note``); elsewhere
        PyTorch's own choice."""
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v)
        if self.sdpa_backend is not None:
            with sdpa_kernel(self.sdpa_backend):
                return F.scaled_dot_product_attention(q, k, v)
        refused = []
        for backend in SDPA_BACKENDS:
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
                warnings.simplefilter("always")
                try:
                    out = F.scaled_dot_product_attention(q, k, v)
                except RuntimeError as exc:
                    if "No available kernel" not in str(exc):
                        raise
                    messages = (re.sub(r"\s*\(Triggered internally at [^)]*\)", "", str(w.message)).strip()
                                for w in caught)
                    reasons = "; ".join(dict.fromkeys(m for m in messages if not m.endswith("because:"))) or str(exc)
                    refused.append(f"{backend.name} refused ({reasons})")
                    continue
            self.sdpa_backend = backend
            self.sdpa_note = "; ".join([f"SDPA kernel {backend.name}", *refused])
            return out
        raise RuntimeError("no SDPA kernel accepted the inputs: " + "; ".join(refused))

    def forward(self, v: Tensor, hw: tuple[int, int], gate: Tensor | None = None) -> Tensor:
        B, N, C = v.shape
        q, k = self.qk(v).chunk(2, dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

        # The block's v is a channels-first view (stride N between channels); SDPA's fused kernels need
        # each head's channels contiguous.
        out = self._sdpa(heads(q), heads(k), heads(v.contiguous()))
        out = out.transpose(1, 2).reshape(B, N, C) + dwconv_tokens_ref(v, self.lepe.weight, self.lepe.bias, hw)
        return out if gate is None else out * gate


def parse_grid(text: str) -> tuple[int, int]:
    """"512" -> (512, 512); "512x256" -> (512, 256)."""
    parts = text.lower().split("x")
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        grid = ()
    if len(grid) == 1:
        grid = grid * 2
    if len(grid) != 2 or min(grid) < 1:
        raise argparse.ArgumentTypeError(f"a grid is SIDE or HxW with positive integers, got {text!r}")
    return grid


def grid_label(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def block_weights(dim: int, heads: int, seed: int) -> dict[str, Tensor]:
    """Weights for every variant: the released initialisation, with non-zero biases and norm parameters
    (as a trained block has) so the correctness check sees every term. The RoPE table is left out: each
    block builds its own for its grid."""
    torch.manual_seed(seed)
    block = ReferenceBlock(dim, (8, 8), heads)
    block.apply(trunc_normal_init)
    weights = {}
    for key, value in block.state_dict().items():
        if key.endswith(ROPE_KEY):
            continue
        value = value.detach().clone()
        if value.dim() == 1:
            value += 0.05 * torch.randn_like(value)
        weights[key] = value
    return weights


def load_weights(module: nn.Module, weights: dict[str, Tensor]) -> None:
    """load_state_dict(weights), allowing only the RoPE tables (not in weights) to be missing."""
    result = module.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(ROPE_KEY)]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the block: missing {missing}, unexpected {result.unexpected_keys}")


def make_block(variant: str, dim: int, heads: int, grid: tuple[int, int], weights: dict[str, Tensor],
               device: torch.device, compile_backend: str = "inductor") -> nn.Module:
    """One variant's block on device at grid, with the shared weights."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    variant = variant.removesuffix("-graph")
    with torch.device(device):
        if variant == "fused":
            block = mlla_fast.MLLABlock(dim, grid, heads, backend="triton")
        else:
            block = ReferenceBlock(dim, grid, heads)
    if variant == "softmax":
        block.attn = SoftmaxAttention(block.attn)
    load_weights(block, weights)
    if variant == "compiled":
        torch._dynamo.reset()  # a fresh compile per grid, and no recompile limit across grids
        return torch.compile(block, backend=compile_backend, dynamic=False)
    return block


def check_fused(args: argparse.Namespace, weights: dict[str, Tensor], device: torch.device) -> CheckResult:
    """The fused block against the eager reference on a small grid, B = 1 and 2 (see common.check_batches)."""
    grid = args.check_grid
    try:
        reference = make_block("eager", args.dim, args.heads, grid, weights, device)
        fused = make_block("fused", args.dim, args.heads, grid, weights, device)
    except Exception as exc:
        return CheckResult(False, f"could not build the blocks: {describe_error(exc)}")
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def tokens(batch: int) -> Tensor:
        return torch.randn(batch, grid[0] * grid[1], args.dim, generator=gen, device=device)

    low_precision = DTYPES[args.dtype] if args.dtype != "fp32" else None
    return check_batches(fused, reference, tokens, low_precision=low_precision)


def build_point(variant: str, mode: str, grid: tuple[int, int], args: argparse.Namespace,
                weights: dict[str, Tensor], device: torch.device, built: dict[str, Any] | None = None):
    """The (step, setup) pair that common.measure times for one variant, mode and grid (the block goes
    into ``built["block"]`` when given; a graph variant's first call captures the step, and
    ``built["capture_peak_bytes"]`` is the peak memory of its warm-up and capture)."""
    block = make_block(variant, args.dim, args.heads, grid, weights, device, args.compile_backend)
    if built is not None:
        built["block"] = block
    dtype = DTYPES[args.dtype]
    train = mode == "fwd+bwd"
    shape = (args.batch, grid[0] * grid[1], args.dim)

    def setup() -> tuple[Tensor, Tensor | None]:
        block.zero_grad(set_to_none=True)
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=train)
        return x, torch.randn(shape, device=device, dtype=dtype) if train else None

    def step(x: Tensor, grad: Tensor | None) -> None:
        if train:
            with autocast(device, dtype):
                out = block(x)
            out.backward(grad)
        else:
            with torch.no_grad(), autocast(device, dtype):
                block(x)

    if variant not in GRAPH_VARIANTS:
        return step, setup

    def captured(x: Tensor, grad: Tensor | None = None) -> None:
        # the graph's static input takes no gradient: a leaf view of it does, so that the input gradient is
        # computed (into the graph's memory pool, like the parameters' after zero_grad(set_to_none=True))
        block.zero_grad(set_to_none=True)
        step(x.detach().requires_grad_(train), grad)

    graphed = graphed_on_first_call(captured, device, {} if built is None else built)

    def graph_step(x: Tensor, grad: Tensor | None) -> None:
        graphed(*((x,) if grad is None else (x, grad)))

    return graph_step, setup


def run_sweep(args: argparse.Namespace, device: torch.device, timing: TimingConfig,
              checks: dict[str, CheckResult], weights: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Measure every (variant, mode) at every grid; returns one row per point."""
    cpu = device.type != "cuda"

    def run(key: tuple[str, str], grid: tuple[int, int]) -> Measurement:
        variant, mode = key
        if variant.startswith("fused") and cpu:
            return Measurement(SKIPPED, note="the fused kernels need a CUDA device (CPU demonstration)")
        if variant in GRAPH_VARIANTS and cpu:
            return Measurement(SKIPPED, note="CUDA graphs need a CUDA device (CPU demonstration)")
        check = checks.get(variant.removesuffix("-graph"))
        if check is not None and not check.passed:
            return Measurement(FAILED_CHECK, note=check.detail)
        built = {}
        result = measure(lambda: build_point(variant, mode, grid, args, weights, device, built), device, timing)
        if variant == "compiled":
            release_compiled(device)
        result = with_capture_peak(result, built)
        sdpa_note = getattr(getattr(built.get("block"), "attn", None), "sdpa_note", "")
        if sdpa_note:
            result = dataclasses.replace(result, note="; ".join(filter(None, (result.note, sdpa_note))))
        return result

    def log(key: tuple[str, str], grid: tuple[int, int], m: Measurement) -> None:
        print(f"  {grid_label(grid):>9}  {key[0]:<8} {key[1]:<7} {describe_measurement(m)}", flush=True)

    keys = [(v, m) for v in args.variants for m in args.modes]
    grids = sorted(args.grids, key=lambda g: g[0] * g[1])
    points = sweep(grids, keys, run, size=lambda g: g[0] * g[1], budget_s=timing.budget_s, describe=grid_label,
                   log=log)
    return [
        {"variant": v, "mode": m, "grid": grid_label(g), "height": g[0], "width": g[1], "pixels": g[0] * g[1],
         "batch": args.batch, "dim": args.dim, "heads": args.heads, "dtype": args.dtype, **meas.as_dict()}
        for (v, m), g, meas in points
    ]


def fit_slopes(rows: Sequence[dict[str, Any]], fit_min: int) -> list[dict[str, Any]]:
    """Log-log slopes of time and of peak memory against pixels per (variant, mode), measured points only.

    Over the grids >= fit_min² (above the launch-bound regime). A variant with fewer than two measured
    points there (softmax attention runs out of memory long before) is fitted over its two largest
    measured grids instead (the smaller ones are the most launch-bound), and its row says so (``fallback``)."""
    out = []
    for key in dict.fromkeys((r["variant"], r["mode"]) for r in rows):
        ok = sorted((r for r in rows if (r["variant"], r["mode"]) == key and r["status"] == "ok"),
                    key=lambda r: r["pixels"])
        fitted = [r for r in ok if r["pixels"] >= fit_min**2]
        fallback = len(fitted) < 2
        if fallback:
            fitted = ok[-2:]
        pixels = [r["pixels"] for r in fitted]
        out.append({
            "variant": key[0], "mode": key[1], "fit_min_pixels": fit_min**2, "fallback": fallback,
            "points": len(fitted),
            "grids": [r["grid"] for r in fitted],
            "time_slope": fit_loglog_slope(pixels, [r["median_ms"] for r in fitted]),
            "memory_slope": fit_loglog_slope(pixels, [r["peak_bytes"] for r in fitted]),
        })
    return out


def cell(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    if row["peak_bytes"] is None:
        return fmt_ms(row["median_ms"])
    return f"{fmt_ms(row['median_ms'])} {fmt_bytes(row['peak_bytes'])}"


def report(rows: Sequence[dict[str, Any]], slopes: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    """The printed tables: per mode, grids x variants (median time, peak memory), ratios to fused, slopes."""
    lines = []
    by_key = {(r["variant"], r["mode"], r["grid"]): r for r in rows}
    others = [v for v in args.variants if v != "fused"]
    for mode in args.modes:
        headers = ["grid", "pixels", *args.variants]
        if "fused" in args.variants:
            headers += [f"{v}/fused" for v in others] + (["mem eager/fused"] if "eager" in others else [])
        table = []
        for grid in map(grid_label, sorted(args.grids, key=lambda g: g[0] * g[1])):
            cells = [by_key[(v, mode, grid)] for v in args.variants]
            line = [grid, f"{cells[0]['pixels']:,}", *map(cell, cells)]
            if "fused" in args.variants:
                fused = by_key[("fused", mode, grid)]
                line += [fmt_ratio(by_key[(v, mode, grid)]["median_ms"], fused["median_ms"]) for v in others]
                if "eager" in others:
                    line.append(fmt_ratio(by_key[("eager", mode, grid)]["peak_bytes"], fused["peak_bytes"]))
            table.append(line)
        lines += [f"\n[{mode}] median time per call and peak memory", format_table(headers, table)]
        if {"fused-graph", "eager-graph"} <= set(args.variants):
            graph_table = [
                [grid, fmt_ratio(by_key[("eager-graph", mode, grid)]["median_ms"],
                                 by_key[("fused-graph", mode, grid)]["median_ms"]),
                 fmt_ratio(by_key[("eager-graph", mode, grid)]["peak_bytes"],
                           by_key[("fused-graph", mode, grid)]["peak_bytes"])]
                for grid in map(grid_label, sorted(args.grids, key=lambda g: g[0] * g[1]))]
            lines += [f"\n[{mode}] CUDA graphs: the reference against the fused block, both without launch overhead",
                      format_table(["grid", "time eager-graph/fused-graph", "mem eager-graph/fused-graph"],
                                   graph_table)]
    slope_rows = [
        [s["variant"], s["mode"], "-" if s["time_slope"] is None else f"{s['time_slope']:.2f}",
         "-" if s["memory_slope"] is None else f"{s['memory_slope']:.2f}",
         (", ".join(s["grids"]) or "-") + (" (largest measured; fewer than 2 above the fit minimum)"
                                            if s["fallback"] and s["grids"] else "")]
        for s in slopes
    ]
    lines += [f"\nlog-log slopes against pixel count (grids >= {args.fit_min}x{args.fit_min}, measured points only)",
              format_table(["variant", "mode", "time slope", "memory slope", "grids fitted"], slope_rows)]
    notes = sorted({(r["variant"], r["mode"], r["status"], r["note"]) for r in rows if r["note"]})
    if notes:
        lines.append("\nnotes")
        lines += [f"  {v} {m}: {s}: {n}" for v, m, s, n in notes]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], slopes: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Time and peak memory against pixel count, log-log, one line per variant and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"fwd": "--", "fwd+bwd": "-"}
    colours = dict(zip(VARIANTS, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:cyan"),
                       strict=True))
    for s in slopes:
        ok = sorted((r for r in rows if (r["variant"], r["mode"]) == (s["variant"], s["mode"]) and r["status"] == "ok"),
                    key=lambda r: r["pixels"])
        if not ok:
            continue
        style = dict(linestyle=styles[s["mode"]], color=colours[s["variant"]], marker="o", markersize=4)
        name = f"{s['variant']} {s['mode']}"
        t_slope = "" if s["time_slope"] is None else f" (slope {s['time_slope']:.2f})"
        ax_t.plot([r["pixels"] for r in ok], [r["median_ms"] for r in ok], label=name + t_slope, **style)
        mem = [(r["pixels"], r["peak_bytes"] / 2**30) for r in ok if r["peak_bytes"]]
        if mem:
            m_slope = "" if s["memory_slope"] is None else f" (slope {s['memory_slope']:.2f})"
            ax_m.plot(*zip(*mem, strict=True), label=name + m_slope, **style)
    for ax, ylabel in ((ax_t, "median time per call (ms)"), (ax_m, "peak memory (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (H x W)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "no device memory counter on CPU", ha="center", va="center", transform=ax_m.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dim", type=int, default=64, help="channels C")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (C / heads = 32 in MLLA)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--grids", nargs="+", type=parse_grid, default=None, metavar="SIDE|HxW",
                        help=f"token grids (default: {' '.join(GPU_GRIDS)} on a GPU, {' '.join(CPU_GRIDS)} on CPU)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all on a GPU, eager on CPU")
    parser.add_argument("--fit-min", type=int, default=None, metavar="SIDE",
                        help="fit slopes over grids with at least SIDE² pixels (default: 1024 on a GPU, where smaller "
                             "grids are launch-bound at B=1; 32 on CPU)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                        help="measure nothing: refit the slopes of a results JSON of this script (with --fit-min "
                             "if given) and rewrite its slopes, table and plot")
    parser.add_argument("--check-grid", type=parse_grid, default=(32, 48), metavar="HxW",
                        help="grid of the fused variant's correctness check")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled'")
    parser.add_argument("--seed", type=int, default=0)
    add_timing_arguments(parser, budget_s=2.0)
    add_output_argument(parser)
    return parser.parse_args(argv)


def run_title(args: argparse.Namespace, env: dict[str, Any]) -> str:
    return (f"MLLA block scaling: C={args.dim}, heads={args.heads}, B={args.batch}, {args.dtype} | "
            f"{env['card']} | {env['label']}")


def write_plot(rows: Sequence[dict[str, Any]], slopes: Sequence[dict[str, Any]], path: Path, title: str,
               written: list[Path]) -> None:
    """The PNG (appended to written), or a note when matplotlib is missing."""
    try:
        plot(rows, slopes, path, title)
        written.append(path)
    except ImportError as exc:
        print(f"no plot: {exc}")


def refit(path: Path, fit_min: int | None) -> int:
    """--from-json: the slopes, table and plot of a results JSON again, from its measured rows (nothing is
    re-measured): the JSON's ``slopes`` are replaced and ``slopes_refitted`` says by which commit, when."""
    try:
        payload = json.loads(path.read_text())
        config, rows, env = payload["config"], payload["results"], payload["env"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--from-json {path}: expected a results JSON written by this script ({exc})") from exc
    args = argparse.Namespace(**{**config, "fit_min": fit_min or config["fit_min"],
                                 "grids": [parse_grid(g) for g in config["grids"]]})
    slopes = fit_slopes(rows, args.fit_min)
    title = run_title(args, env)
    print(title)
    print(describe_environment(env))
    print(report(rows, slopes, args))
    commit, dirty = git_state()
    payload["config"]["fit_min"] = args.fit_min
    payload["slopes"] = slopes
    payload["slopes_refitted"] = {"by": "benchmarks/scaling.py --from-json", "commit": commit, "dirty": dirty,
                                  "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    write_json(path, payload)
    written = [path]
    write_plot(rows, slopes, path.with_suffix(".png"), title, written)
    print("\nrewrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        return refit(args.from_json, args.fit_min)
    device = default_device()
    cpu = device.type != "cuda"
    if cpu:
        print(NO_GPU_MESSAGE)
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.grids = args.grids or [parse_grid(g) for g in (CPU_GRIDS if cpu else GPU_GRIDS)]
    args.variants = args.variants or (["eager"] if cpu else [v for v in VARIANTS if v not in GRAPH_VARIANTS])
    args.fit_min = args.fit_min or (32 if cpu else 1024)
    timing = timing_from_args(args)
    env = environment(device)
    title = run_title(args, env)
    print(title)
    print(describe_environment(env))

    weights = block_weights(args.dim, args.heads, args.seed)
    checks: dict[str, CheckResult] = {}
    if {"fused", "fused-graph"} & set(args.variants) and not cpu:
        checks["fused"] = check_fused(args, weights, device)
        print(f"fused correctness check ({grid_label(args.check_grid)}): "
              f"{'passed' if checks['fused'].passed else 'FAILED'}: {checks['fused'].detail}")

    rows = run_sweep(args, device, timing, checks, weights)
    slopes = fit_slopes(rows, args.fit_min)
    print(report(rows, slopes, args))
    if cpu:
        print(f"\n({CPU_DEMO_LABEL})")

    out = output_dir(args.out, env)
    if out is not None:
        stem = out / f"scaling_C{args.dim}_h{args.heads}_B{args.batch}_{args.dtype}"
        config = {**{k: v for k, v in vars(args).items() if k != "out"}, "grids": [grid_label(g) for g in args.grids],
                  "check_grid": grid_label(args.check_grid)}
        payload = {"benchmark": "scaling", "label": env["label"], "env": env, "config": config,
                   "timing": dataclasses.asdict(timing),
                   "checks": {k: dataclasses.asdict(c) for k, c in checks.items()}, "slopes": slopes,
                   "results": rows}
        write_json(stem.with_suffix(".json"), payload)
        write_csv(stem.with_suffix(".csv"), rows, env)
        written = [stem.with_suffix(".json"), stem.with_suffix(".csv")]
        write_plot(rows, slopes, stem.with_suffix(".png"), title, written)
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
