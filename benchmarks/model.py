"""MLLA-UNet throughput and peak memory: training steps and inference, fused against the reference.

Variants, same initialisation (seeded): ``fused`` (``create_model(..., backend="triton")``), ``eager``
(``backend="torch"``), ``compiled`` (``torch.compile`` of the ``backend="torch"`` model, static
shapes; its compile time is the ``first_call_s`` column), and ``fused-graph`` / ``eager-graph``: the
``fused`` / ``eager`` model with the whole step (train: zero_grad, forward, loss, backward, AdamW
step; infer: the forward) captured in one CUDA graph by ``mlla_fast.graphs.GraphedStep`` and
replayed. A small model's step is mostly Python and kernel-launch overhead; the graph variants show
the GPU time alone, and ``eager-graph`` is the reference without that overhead, for a fair ratio.
Their first call does the warm-up steps and the capture (the ``first_call_s`` column); every timed
call copies fresh inputs into the graph's static inputs and replays. Their optimizer is AdamW with
``capturable=True`` (its step count on the device). On CUDA every variant's AdamW is PyTorch's fused one
(``fused=True``), as ``mlla-fast train`` uses; before session 14 they ran the foreach AdamW (1.9 ms of a 30 ms
MLLA-UNet-T step on an H200). Their peak memory is the peak over the warm-up
and capture: a replay allocates nothing, its temporaries live in the graph's private memory pool,
reserved at capture. The fused variants are reported only if this run's quick correctness check
against the reference passes (else "failed-check"); without CUDA, fused and graph variants are
skipped.

Modes: ``train`` = one optimiser step: zero_grad, forward, cross-entropy loss, backward, AdamW step
(the model compiled, not the optimiser); ``infer`` = eval-mode forward under ``torch.no_grad``.
bf16 = autocast to bf16 (fp32 weights and input images, as in mixed-precision training); fp32 = no
autocast. Throughput is batch / median step time.

Prints a table and writes CSV + JSON to ``benchmarks/results/<card>/``. Without a GPU it runs a tiny
CPU demonstration of the reference.

    python benchmarks/model.py                                      # tiny, bf16, 224:48 512:8 1024:2
    python benchmarks/model.py --models tiny --sizes 224:48 --modes train --dtypes bf16 fp32
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make the `benchmarks` folder importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlla_fast
from benchmarks.common import (
    CPU_DEMO_LABEL,
    DTYPES,
    FAILED_CHECK,
    OK,
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
    fmt_bytes,
    fmt_ms,
    fmt_range,
    fmt_ratio,
    format_table,
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

VARIANTS = ("fused", "eager", "compiled", "fused-graph", "eager-graph")
FUSED_VARIANTS = ("fused", "fused-graph")
GRAPH_VARIANTS = ("fused-graph", "eager-graph")
MODES = ("train", "infer")
GPU_SIZES = ("224:48", "512:8", "1024:2")
CPU_SIZES = ("64:2",)
CHECK_SIZE = 64
OVERRIDES = ("embed_dim", "depths", "depths_decoder", "num_heads")
NO_GPU_MESSAGE = (
    "No CUDA device found: running a tiny CPU demonstration of the reference only "
    f"({CPU_DEMO_LABEL}). Run this script on an NVIDIA GPU for the real measurements."
)


def parse_size(text: str) -> tuple[int, int]:
    """"224:48" -> (image side 224, batch 48)."""
    try:
        side, batch = (int(p) for p in text.split(":"))
    except ValueError:
        side = batch = 0
    if side < 32 or side % 32 or batch < 1:
        raise argparse.ArgumentTypeError(f"a size is SIDE:BATCH, SIDE a multiple of 32, BATCH >= 1; got {text!r}")
    return side, batch


def model_name(text: str) -> str:
    name = text.removeprefix("mlla_unet_")
    if name not in mlla_fast.MODEL_CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; expected one of {sorted(mlla_fast.MODEL_CONFIGS)}")
    return name


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Architecture flags given on the command line, replacing the named config's values."""
    return {k: tuple(v) if isinstance(v, list) else v for k in OVERRIDES if (v := getattr(args, k)) is not None}


def build_model(name: str, variant: str, side: int, args: argparse.Namespace,
                device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(model, callable) for one variant on device: the callable is the model, or its torch.compile."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = mlla_fast.create_model(name, num_classes=args.num_classes, in_chans=args.in_chans, img_size=side,
                                       backend="triton" if variant in FUSED_VARIANTS else "torch", **overrides(args))
    if variant == "compiled":
        torch._dynamo.reset()  # a fresh compile per point, and no recompile limit across points
        return model, torch.compile(model, backend=args.compile_backend, dynamic=False)
    return model, model


def check_fused(name: str, args: argparse.Namespace, device: torch.device) -> CheckResult:
    """The fused model against the eager reference (same weights, eval mode) on small images, B = 1 and 2."""
    try:
        reference, _ = build_model(name, "eager", CHECK_SIZE, args, device)
        fused, _ = build_model(name, "fused", CHECK_SIZE, args, device)
        fused.load_state_dict(reference.state_dict(), strict=True)
    except Exception as exc:
        return CheckResult(False, f"could not build the models: {describe_error(exc)}")
    reference.eval()
    fused.eval()
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def images(batch: int) -> Tensor:
        return torch.randn(batch, args.in_chans, CHECK_SIZE, CHECK_SIZE, generator=gen, device=device)

    low_precision = torch.bfloat16 if "bf16" in args.dtypes else None
    return check_batches(fused, reference, images, low_precision=low_precision, cast_input=False)


def build_point(name: str, variant: str, dtype: str, mode: str, side: int, batch: int, args: argparse.Namespace,
                device: torch.device, capture: dict[str, int] | None = None):
    """The (step, setup) pair that common.measure times for one configuration.

    setup() gives the inputs: (images, labels) to train, (images,) to infer. A graph variant's first
    step captures the eager step with GraphedStep; capture["capture_peak_bytes"] then holds the peak memory
    allocated over its warm-up and capture (the replays allocate nothing).
    """
    model, runner = build_model(name, variant, side, args, device)
    train = mode == "train"
    graphed = variant in GRAPH_VARIANTS
    model.train(train)
    dt = DTYPES[dtype]
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, capturable=graphed,
                                   fused=device.type == "cuda")
                 if train else None)

    def setup() -> tuple[Tensor, ...]:
        x = torch.randn(batch, args.in_chans, side, side, device=device)
        if not train:
            return (x,)
        return x, torch.randint(0, args.num_classes, (batch, side, side), device=device)

    def eager_step(x: Tensor, y: Tensor | None = None) -> Tensor:
        if train:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dt):
                loss = F.cross_entropy(runner(x), y)
            loss.backward()
            optimizer.step()
            return loss
        with torch.no_grad(), autocast(device, dt):
            return runner(x)

    if not graphed:
        return eager_step, setup
    return graphed_on_first_call(eager_step, device, {} if capture is None else capture), setup


def run_sweep(args: argparse.Namespace, device: torch.device, timing: TimingConfig,
              checks: dict[str, CheckResult]) -> list[dict[str, Any]]:
    """Measure every (model, dtype, mode, variant) at every size, smallest image first; one row per point."""
    cpu = device.type != "cuda"

    def run(key: tuple[str, str, str, str], size: tuple[int, int]) -> Measurement:
        name, dtype, mode, variant = key
        side, batch = size
        if variant == "fused" and cpu:
            return Measurement(SKIPPED, note="the fused kernels need a CUDA device (CPU demonstration)")
        if variant in GRAPH_VARIANTS and cpu:
            return Measurement(SKIPPED, note="CUDA graphs need a CUDA device (CPU demonstration)")
        if variant in FUSED_VARIANTS and not checks[name].passed:
            return Measurement(FAILED_CHECK, note=checks[name].detail)
        if variant == "compiled" and side not in args.compiled_sizes:
            return Measurement(SKIPPED, note=f"compiled only at --compiled-sizes {args.compiled_sizes}")
        capture: dict[str, int] = {}
        result = measure(lambda: build_point(name, variant, dtype, mode, side, batch, args, device, capture),
                         device, timing)
        if variant == "compiled":
            release_compiled(device)
        return with_capture_peak(result, capture)

    def log(key: tuple[str, str, str, str], size: tuple[int, int], m: Measurement) -> None:
        print(f"  {size[0]:>4}:{size[1]:<3} {' '.join(key)}: {describe_measurement(m)}", flush=True)

    keys = [(n, d, m, v) for n in args.models for d in args.dtypes for m in args.modes for v in args.variants]
    sizes = sorted(args.sizes)
    points = sweep(sizes, keys, run, size=lambda s: s[0] ** 2 * s[1], budget_s=timing.budget_s,
                   describe=lambda s: f"{s[0]}x{s[0]} batch {s[1]}", log=log)
    suffix = "+custom" if overrides(args) else ""
    rows = []
    for (name, dtype, mode, variant), (side, batch), meas in points:
        rows.append({
            "model": f"mlla_unet_{name}{suffix}", "image_size": side, "batch": batch, "dtype": dtype, "mode": mode,
            "variant": variant, **meas.as_dict(),
            "images_per_s": batch / meas.seconds if meas.status == OK and meas.seconds else None,
        })
    return rows


def report(rows: Sequence[dict[str, Any]]) -> str:
    """The printed tables: every point, fused against the others, and the graph variants against the rest."""
    table = [
        [r["model"], f"{r['image_size']}", f"{r['batch']}", r["dtype"], r["mode"], r["variant"], r["status"],
         fmt_ms(r["median_ms"]), fmt_range(r["q25_ms"], r["q75_ms"]),
         "-" if r["images_per_s"] is None else f"{r['images_per_s']:,.1f}",
         fmt_bytes(r["peak_bytes"]), "-" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"]
        for r in rows
    ]
    lines = [format_table(["model", "size", "batch", "dtype", "mode", "variant", "status", "median/step", "IQR",
                           "images/s", "peak memory", "first call s"], table)]
    by_key = {(r["model"], r["image_size"], r["batch"], r["dtype"], r["mode"], r["variant"]): r for r in rows}
    ratios = []
    for key in dict.fromkeys(k[:5] for k in by_key):
        fused = by_key.get((*key, "fused"))
        if fused is None or fused["status"] != OK:
            continue
        eager, compiled = by_key.get((*key, "eager"), {}), by_key.get((*key, "compiled"), {})
        ratios.append([*map(str, key), fmt_ratio(eager.get("median_ms"), fused["median_ms"]),
                       fmt_ratio(compiled.get("median_ms"), fused["median_ms"]),
                       fmt_ratio(eager.get("peak_bytes"), fused["peak_bytes"])])
    if ratios:
        lines += ["\nfused against the reference (time ratios > 1: fused is faster; memory: eager / fused)",
                  format_table(["model", "size", "batch", "dtype", "mode", "eager/fused", "compiled/fused",
                                "mem eager/fused"], ratios)]
    graph_ratios = []
    for key in dict.fromkeys(k[:5] for k in by_key):
        times = {v: r["median_ms"] for v in VARIANTS if (r := by_key.get((*key, v))) and r["status"] == OK}
        if not any(v in times for v in GRAPH_VARIANTS):
            continue
        graph_ratios.append([*map(str, key), fmt_ratio(times.get("fused"), times.get("fused-graph")),
                             fmt_ratio(times.get("eager"), times.get("eager-graph")),
                             fmt_ratio(times.get("eager-graph"), times.get("fused-graph"))])
    if graph_ratios:
        lines += ["\nCUDA graphs (time ratios a/b > 1: b is faster; X/X-graph: the gain from no launch overhead)",
                  format_table(["model", "size", "batch", "dtype", "mode", "fused/fused-graph", "eager/eager-graph",
                                "eager-graph/fused-graph"], graph_ratios)]
    notes = sorted({(r["model"], r["variant"], r["status"], r["note"]) for r in rows if r["note"]})
    if notes:
        lines.append("\nnotes")
        lines += [f"  {m} {v}: {s}: {n}" for m, v, s, n in notes]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", type=model_name, default=["tiny"], help="tiny, small, base")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="SIDE:BATCH",
                        help=f"input sizes and batches (default: {' '.join(GPU_SIZES)} on a GPU, "
                             f"{' '.join(CPU_SIZES)} on CPU)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all on a GPU, eager on CPU")
    parser.add_argument("--compiled-sizes", nargs="+", type=int, default=[224], metavar="SIDE",
                        help="image sides at which the compiled variant runs (each is a compile of minutes)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of 'compiled'")
    arch = parser.add_argument_group("architecture overrides (default: the named config's values)")
    arch.add_argument("--embed-dim", type=int, default=None, help="C0, a multiple of 32")
    arch.add_argument("--depths", nargs=4, type=int, default=None, help="encoder blocks per stage")
    arch.add_argument("--depths-decoder", nargs=4, type=int, default=None, help="decoder blocks per stage")
    arch.add_argument("--num-heads", nargs=4, type=int, default=None, help="heads per stage (32 channels each)")
    parser.add_argument("--num-classes", type=int, default=9)
    parser.add_argument("--in-chans", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    add_timing_arguments(parser, budget_s=10.0)
    add_output_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = default_device()
    cpu = device.type != "cuda"
    if cpu:
        print(NO_GPU_MESSAGE)
    args.sizes = args.sizes or [parse_size(s) for s in (CPU_SIZES if cpu else GPU_SIZES)]
    args.dtypes = args.dtypes or (["fp32"] if cpu else ["bf16"])
    args.variants = args.variants or (["eager"] if cpu else list(VARIANTS))
    timing = timing_from_args(args)
    env = environment(device)
    print(f"MLLA-UNet throughput | {env['card']} | {env['label']}")
    print(describe_environment(env))

    checks: dict[str, CheckResult] = {}
    if any(v in FUSED_VARIANTS for v in args.variants) and not cpu:
        for name in args.models:
            checks[name] = check_fused(name, args, device)
            print(f"fused correctness check, mlla_unet_{name} ({CHECK_SIZE}x{CHECK_SIZE}): "
                  f"{'passed' if checks[name].passed else 'FAILED'}: {checks[name].detail}")

    rows = run_sweep(args, device, timing, checks)
    print(report(rows))
    if cpu:
        print(f"\n({CPU_DEMO_LABEL})")

    out = output_dir(args.out, env)
    if out is not None:
        sides = "-".join(str(s) for s, _ in sorted(args.sizes))
        stem = out / f"model_{'-'.join(args.models)}_{'-'.join(args.dtypes)}_{sides}"
        config = {**{k: v for k, v in vars(args).items() if k != "out"},
                  "sizes": [f"{s}:{b}" for s, b in args.sizes]}
        payload = {"benchmark": "model", "label": env["label"], "env": env, "config": config,
                   "timing": dataclasses.asdict(timing),
                   "checks": {k: dataclasses.asdict(c) for k, c in checks.items()}, "results": rows}
        write_json(stem.with_suffix(".json"), payload)
        write_csv(stem.with_suffix(".csv"), rows, env)
        print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
