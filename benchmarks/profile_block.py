"""Where the time of one MLLA block (or a whole MLLA-UNet training step) goes, kernel by kernel, on a GPU.

Runs a few warm-up calls, then profiles ``--steps`` calls of forward+backward under the CUDA profiler
and prints the kernels sorted by total GPU time, with their share of the whole. With ``--host`` it
profiles the host side instead, for steps bound by launch overhead: the wall time per step, the host
operators by self CPU time (torch profiler) and the Python functions by own time (cProfile). With
``--memory`` it records the allocator's history over one step instead and prints what is live at the step's
peak, by the line of mlla_fast (or of this script) that allocated it, in units of the block's (B, N, C)
activation (a 2-byte token tensor of the input's shape).

    python benchmarks/profile_block.py --grid 512 --batch 2 --backend triton     # one block, bf16 autocast
    python benchmarks/profile_block.py --model tiny --image 224 --batch 48         # a U-Net training step
    python benchmarks/profile_block.py --model tiny --image 224 --batch 48 --host  # its host side
    python benchmarks/profile_block.py --grid 1024 --batch 2 --memory              # what is live at the peak
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mlla_fast


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    device = torch.device("cuda")
    if args.model:
        model = mlla_fast.create_model(args.model, num_classes=9, img_size=224, backend=args.backend)
        x = torch.randn(args.batch, 3, args.image, args.image, device=device)
    else:
        model = mlla_fast.MLLABlock(args.dim, (args.grid, args.grid), args.dim // 32, backend=args.backend)
        x = torch.randn(args.batch, args.grid * args.grid, args.dim, device=device, dtype=torch.bfloat16)
    return model.to(device).train(), x.requires_grad_(not args.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=512, help="block grid side")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--model", choices=["tiny", "small", "base"], default=None, help="profile a U-Net step")
    parser.add_argument("--image", type=int, default=224, help="U-Net input side")
    parser.add_argument("--backend", choices=mlla_fast.BACKENDS, default="triton")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--host", action="store_true", help="profile the host side (CPU time) instead of the GPU")
    parser.add_argument("--memory", action="store_true", help="what is live at one step's memory peak, by site")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_block.py needs a CUDA device")
    model, x = build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if args.model else None
    # the block's output gradient, made once, and its input's and parameters' gradients cleared before each step:
    # neither a fill nor an accumulation into earlier gradients is the block's work
    dy = None if args.model else torch.ones_like(x)

    def step() -> None:
        if not args.model:
            x.grad = None
            model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        if args.model:
            out.float().square().mean().backward()
        else:
            out.backward(dy)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.host:
        profile_host(step, args)
        return
    if args.memory:
        profile_memory(step, x, args)
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) or 1.0
    what = f"MLLA-UNet-{args.model} {args.image}^2" if args.model else f"MLLA block C={args.dim} {args.grid}^2"
    print(f"{what}, batch {args.batch}, backend {args.backend}, bf16 autocast, fwd+bwd"
          f"{' + AdamW' if args.model else ''}: {total / 1e3 / args.steps:.2f} ms of GPU time per step")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel")
    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[: args.rows]:
        print(f"{e.self_device_time_total / 1e3 / args.steps:9.3f} {e.self_device_time_total / total:6.1%} "
              f"{e.count // args.steps:6d}  {e.key[:110]}")
    print_triton_kernels()


def print_triton_kernels() -> None:
    """Every Triton kernel of mlla_fast compiled so far: warps, stages, registers per thread, spilled
    registers and shared memory, one line per specialisation (what the profile's times cannot show)."""
    from mlla_fast.kernels import dwconv, linear_attention, sampling

    rows = []
    for module in (linear_attention, dwconv, sampling):
        for name, fn in vars(module).items():
            for caches in getattr(fn, "device_caches", {}).values():
                for kernel in caches[0].values():
                    meta = kernel.metadata
                    rows.append((name, meta.num_warps, meta.num_stages, kernel.n_regs, kernel.n_spills, meta.shared))
    print(f"\ncompiled Triton kernels ({len(rows)} specialisations)")
    print(f"{'warps':>5} {'stages':>6} {'regs':>5} {'spills':>6} {'shared':>7}  kernel")
    for name, warps, stages, regs, spills, shared in sorted(rows):
        print(f"{warps:5d} {stages:6d} {regs:5d} {spills:6d} {shared:7d}  {name}")


def profile_host(step, args: argparse.Namespace) -> None:
    """Wall time per step, then the host side of the steps: operators by self CPU time, Python by own time."""

    def run_steps() -> None:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()

    t0 = time.perf_counter()
    run_steps()
    wall = (time.perf_counter() - t0) / args.steps
    print(f"{args.model or 'block'}, batch {args.batch}, backend {args.backend}: {wall * 1e3:.1f} ms wall per step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps()
    print(f"host operators by self CPU time ({args.steps} steps, under the profiler):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    profiler = cProfile.Profile()
    profiler.enable()
    run_steps()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(f"Python functions by own time ({args.steps} steps, under cProfile):")
    print(text.getvalue())


def profile_memory(step, x: torch.Tensor, args: argparse.Namespace) -> None:
    """Replays the allocator's trace of one step: the peak above the step's start and the blocks live there,
    grouped by their allocation site (the innermost frame in mlla_fast or this script, and the frame above it)."""
    unit = x.numel() * 2 if not args.model else None
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    peak_site = ""
    for event in trace:
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, allocation_site(event.get("frames", [])))
            current += size
            if current > peak:
                peak, at_peak, peak_site = current, dict(live), live[addr][1]
        elif action == "free_completed" and addr in live:
            current -= live.pop(addr)[0]
    scale, label = (unit, "units") if unit else (2**20, "MiB")
    print(f"{args.model or 'block'}, batch {args.batch}, bf16 autocast, fwd+bwd: {start / 2**20:.1f} MiB allocated "
          f"before the step, peak {peak / scale:.2f} {label} above it ({(start + peak) / 2**30:.3f} GiB in all); "
          f"one unit = {unit or 0} bytes")
    print(f"the allocation that made the peak: {peak_site}")
    sites: dict[str, list[int]] = {}
    for size, site in at_peak.values():
        sites.setdefault(site, []).append(size)
    print(f"{label:>8} {'blocks':>6}  allocated at (live at the peak, allocated during the step)")
    for site, sizes in sorted(sites.items(), key=lambda kv: -sum(kv[1])):
        print(f"{sum(sizes) / scale:8.2f} {len(sizes):6d}  {site}")


def allocation_site(frames: list[dict]) -> str:
    """'file:line function < file:line function' of the two innermost frames in mlla_fast or the benchmarks."""
    ours = [f for f in frames if "mlla_fast" in f["filename"] or "benchmarks" in f["filename"]]
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in ours[:2]) or "(torch)"


if __name__ == "__main__":
    main()
