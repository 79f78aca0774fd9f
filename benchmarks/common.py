"""Shared helpers of the benchmark scripts: environment record, timing, OOM/timeout-safe sweeps, output.

Timing rules (DESIGN.md, STYLE.md): warm-up calls (and so compilation, autotuning and JIT) run
before the timed region; every call gets fresh random inputs made outside the timed region; on
CUDA each timed call starts on an idle device after an L2 flush, is timed with CUDA events, and has
the peak-memory counter reset just before it; results are the median and spread over the repeats.
A measurement that runs out of memory, past its time budget or into an error comes back marked
instead of raising, so one variant can never end a run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
CPU_DEMO_DIR_NAME = "cpu-demo"
CPU_DEMO_LABEL = "CPU demonstration, not a GPU result"
GPU_LABEL = "GPU result"

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

OK = "ok"
OOM = "oom"
TIMEOUT = "timeout"
ERROR = "error"
FAILED_CHECK = "failed-check"
SKIPPED = "skipped"
# Statuses after which a variant is not tried at larger sizes; OOM and timeout become "skipped" there,
# an error or a failed check is repeated as is.
STOPPING = (OOM, TIMEOUT, ERROR, FAILED_CHECK)

# The quick correctness checks: fp32 without TF32 against the eager reference, norm-wise relative error.
FP32_CHECK_RTOL = 1e-4
# Low precision is a sanity bound only, for gross errors (precision is the test suite's job, and the strict
# fp32 check always runs first): the candidate's error against the fp32 reference may be at most
# LOWP_CHECK_FACTOR times PyTorch's own low-precision error plus the floor. A fused path keeps more
# intermediates in bf16 than autocast does (~3x autocast's error on a block's input gradient under the
# Triton interpreter).
LOWP_CHECK_FACTOR = 2.0
LOWP_CHECK_FLOOR = 5e-2

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")


# ----------------------------------------------------------------------------------------------------------
# Environment record
# ----------------------------------------------------------------------------------------------------------


def slugify(name: str) -> str:
    """A card name as a folder name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def package_version(*names: str) -> str | None:
    """The installed version of the first of these distributions that is installed, else None."""
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def _run(command: Sequence[str]) -> str | None:
    """stdout of a short command, or None when it is missing or fails."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the repository the benchmarks live in; (None, None) outside a git checkout."""
    if os.environ.get("MLLA_FAST_COMMIT"):
        # a copy of the tree shipped elsewhere (e.g. to a GPU machine, without .git or with a stale one):
        # the sender names the commit
        return os.environ["MLLA_FAST_COMMIT"], os.environ.get("MLLA_FAST_DIRTY") == "1"
    commit = _run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    if not commit:
        return None, None
    status = _run(["git", "-C", str(REPO_ROOT), "status", "--porcelain"])
    return commit, None if status is None else bool(status)


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version reported by nvidia-smi (first GPU), or None without nvidia-smi."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def cpu_name() -> str:
    """The CPU model name (Linux /proc/cpuinfo), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine() or "cpu"


def environment(device: torch.device, bandwidth: bool = True) -> dict[str, Any]:
    """Everything a result needs to be read later: card, driver, versions, commit, date, copy bandwidth.

    ``copy_bandwidth_gbs`` is the measured device-to-device copy rate (bytes read + written per
    second), the yardstick for memory-bound kernels; skipped (None) when ``bandwidth`` is False.
    """
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    commit, dirty = git_state()
    card = torch.cuda.get_device_name(device) if cuda else cpu_name()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": GPU_LABEL if cuda else CPU_DEMO_LABEL,
        "device": str(device),
        "card": card,
        "card_slug": slugify(card),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "sm_count": props.multi_processor_count if props else None,
        "compute_capability": f"{props.major}.{props.minor}" if props else None,
        "driver_version": nvidia_driver_version() if cuda else None,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "torch_version": torch.__version__,
        "triton_version": package_version("triton", "pytorch-triton"),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "git_commit": commit,
        "git_dirty": dirty,
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(device), 1) if bandwidth else None,
    }


def describe_environment(env: Mapping[str, Any]) -> str:
    """One line for the top of a printed report."""
    commit = (env["git_commit"] or "unknown")[:10] + (" (dirty)" if env["git_dirty"] else "")
    parts = [
        env["label"], env["card"], f"driver {env['driver_version']}" if env["driver_version"] else None,
        f"torch {env['torch_version']}", f"triton {env['triton_version']}",
        f"CUDA {env['cuda_version']}" if env["cuda_version"] else None, f"commit {commit}", env["date_utc"],
        f"copy {env['copy_bandwidth_gbs']} GB/s" if env["copy_bandwidth_gbs"] else None,
    ]
    return " | ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    """One measured (or marked) point. Times are per call, in ms; memory in bytes (CUDA only)."""

    status: str
    note: str = ""
    median_ms: float | None = None
    q25_ms: float | None = None
    q75_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    repeats: int = 0
    first_call_s: float | None = None  # wall time of the first call: compilation, autotuning, JIT
    peak_bytes: int | None = None  # torch.cuda.max_memory_allocated during a call: everything live
    work_bytes: int | None = None  # the peak minus what was allocated just before the call

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def seconds(self) -> float | None:
        return None if self.median_ms is None else self.median_ms / 1e3

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How long to measure. ``warmup`` untimed calls come first (at least 2: the first includes compilation,
    the last, warm, is judged against the budget); a call slower than ``budget_s`` marks the variant
    "timeout"; the number of timed repeats aims at ``target_s`` seconds in all, within
    [min_repeats, max_repeats]."""

    budget_s: float = 2.0
    target_s: float = 1.0
    min_repeats: int = 3
    max_repeats: int = 20
    warmup: int = 2

    def __post_init__(self) -> None:
        if self.warmup < 2 or self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise ValueError(
                f"need warmup >= 2 and 1 <= min_repeats <= max_repeats, got warmup={self.warmup}, "
                f"min_repeats={self.min_repeats}, max_repeats={self.max_repeats}"
            )
        if self.budget_s <= 0 or self.target_s <= 0:
            raise ValueError(f"time budget and target must be positive, got {self.budget_s} and {self.target_s}")

    def repeats_for(self, seconds_per_call: float) -> int:
        wanted = math.ceil(self.target_s / max(seconds_per_call, 1e-9))
        return min(self.max_repeats, max(self.min_repeats, wanted))


def add_timing_arguments(parser: argparse.ArgumentParser, budget_s: float) -> None:
    """The timing flags shared by the benchmark scripts."""
    group = parser.add_argument_group("timing")
    group.add_argument("--time-budget", type=float, default=budget_s, metavar="S",
                       help="seconds one call may take; slower (or projected slower) variants are marked 'timeout' "
                            "and dropped from larger sizes (default: %(default)s)")
    group.add_argument("--target-seconds", type=float, default=1.0, metavar="S",
                       help="aim for this much timed work per point (default: %(default)s)")
    group.add_argument("--min-repeats", type=int, default=3, help="fewest timed calls per point (default: %(default)s)")
    group.add_argument("--max-repeats", type=int, default=20, help="most timed calls per point (default: %(default)s)")
    group.add_argument("--warmup", type=int, default=2,
                       help="untimed calls first, at least 2: the first includes compilation, the last is "
                            "judged against the time budget (default: %(default)s)")


def timing_from_args(args: argparse.Namespace) -> TimingConfig:
    return TimingConfig(budget_s=args.time_budget, target_s=args.target_seconds, min_repeats=args.min_repeats,
                        max_repeats=args.max_repeats, warmup=args.warmup)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _l2_bytes(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)


def flush_l2(device: torch.device) -> None:
    """Evict the L2 cache by writing twice its size, so a timed call does not start on warm inputs."""
    if device.type == "cuda":
        torch.empty(2 * _l2_bytes(device.index or 0), dtype=torch.uint8, device=device).zero_()


def timed_call(step: Callable[..., object], args: Sequence[Any], device: torch.device) -> float:
    """Milliseconds one call of step(*args) takes: CUDA events on CUDA, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step(*args)
    return (time.perf_counter() - t0) * 1e3


def is_oom(exc: BaseException) -> bool:
    """Out of device memory, however it surfaced (directly or wrapped by a compiler or autotuner)."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def describe_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graphed_on_first_call(fn: Callable[..., Any], device: torch.device, record: dict[str, int]) -> Callable[..., Any]:
    """fn captured in one CUDA graph (``mlla_fast.graphs.GraphedStep``, with the first call's inputs as the
    example inputs) at its first call, and replayed on every call. ``record["capture_peak_bytes"]`` becomes the
    peak memory allocated over the warm-up and capture: the replays allocate nothing (``with_capture_peak``)."""
    from mlla_fast.graphs import GraphedStep

    graph: list[GraphedStep] = []

    def call(*inputs: torch.Tensor) -> Any:
        if not graph:
            torch.cuda.reset_peak_memory_stats(device)
            graph.append(GraphedStep(fn, *inputs))
            record["capture_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return graph[0](*inputs)

    return call


def with_capture_peak(result: Measurement, record: dict[str, int]) -> Measurement:
    """A graphed point's measurement with the peak memory of its warm-up and capture counted (the larger of it
    and the replays'), and no work bytes."""
    if not result.ok or "capture_peak_bytes" not in record:
        return result
    return dataclasses.replace(result, peak_bytes=max(result.peak_bytes or 0, record["capture_peak_bytes"]),
                               work_bytes=None)


def release_compiled(device: torch.device) -> None:
    """Drop torch.compile's caches (graphs, guards) and the memory they held, before the next variant."""
    torch._dynamo.reset()
    free_memory(device)


def describe_measurement(m: Measurement) -> str:
    """One progress line's worth: the status, or the median time, peak memory and first-call time."""
    if not m.ok:
        return f"{m.status}" + (f" ({m.note})" if m.note else "")
    peak = "" if m.peak_bytes is None else f", peak {fmt_bytes(m.peak_bytes)}"
    return f"{fmt_ms(m.median_ms)} median of {m.repeats}{peak}, first call {m.first_call_s:.1f} s"


Build = Callable[[], tuple[Callable[..., object], Callable[[], Sequence[Any]]]]


def measure(build: Build, device: torch.device, timing: TimingConfig) -> Measurement:
    """Build and time one point, never raising for OOM, time-outs or errors.

    ``build()`` makes the module(s) and returns ``(step, setup)``: ``setup()`` returns fresh inputs
    (outside the timed region) and ``step(*inputs)`` is the timed work. Everything ``build`` made is
    freed before this returns, so the next point starts from an empty device.
    """
    try:
        result = _measure(build, device, timing)
    except Exception as exc:
        result = Measurement(OOM if is_oom(exc) else ERROR, note=describe_error(exc))
    free_memory(device)
    return result


def _measure(build: Build, device: torch.device, timing: TimingConfig) -> Measurement:
    cuda = device.type == "cuda"
    step, setup = build()
    wall = []
    for _ in range(timing.warmup):
        args = setup()
        synchronize(device)
        t0 = time.perf_counter()
        step(*args)
        synchronize(device)
        wall.append(time.perf_counter() - t0)
        del args
    # The last warm-up call is compiled and warm: it decides the budget and the repeat count.
    per_call = wall[-1]
    if per_call > timing.budget_s:
        return Measurement(TIMEOUT, note=f"{per_call:.2f} s per call > budget {timing.budget_s:g} s",
                           first_call_s=wall[0])
    times, peaks, works = [], [], []
    for _ in range(timing.repeats_for(per_call)):
        args = setup()
        flush_l2(device)
        synchronize(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times.append(timed_call(step, args, device))
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            peaks.append(peak)
            works.append(peak - base)
        del args
    q25, median, q75 = np.percentile(times, [25, 50, 75]).tolist()
    return Measurement(
        OK, median_ms=median, q25_ms=q25, q75_ms=q75, min_ms=min(times), max_ms=max(times), repeats=len(times),
        first_call_s=wall[0], peak_bytes=max(peaks) if peaks else None, work_bytes=max(works) if works else None,
    )


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    ms = float(np.median([timed_call(dst.copy_, (src,), device) for _ in range(repeats)]))
    del src, dst
    free_memory(device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------
# Sweeps over growing sizes
# ----------------------------------------------------------------------------------------------------------


def project_seconds(history: Sequence[tuple[float, float]], size: float) -> float | None:
    """Projected seconds per call at ``size`` from earlier (size, seconds) points of the same variant.

    The local log-log slope of the last two points, clamped to [1, 3] (never assume better than linear),
    or 2 (quadratic) from a single point. None without history.
    """
    if not history:
        return None
    last_size, last_s = history[-1]
    slope = 2.0
    if len(history) >= 2:
        prev_size, prev_s = history[-2]
        if prev_size != last_size and prev_s > 0 and last_s > 0:
            slope = math.log(last_s / prev_s) / math.log(last_size / prev_size)
    return last_s * (size / last_size) ** min(3.0, max(1.0, slope))


def sweep(points: Sequence[P], keys: Sequence[K], run: Callable[[K, P], Measurement], size: Callable[[P], float],
          budget_s: float, describe: Callable[[P], str] = str,
          log: Callable[[K, P, Measurement], None] | None = None) -> list[tuple[K, P, Measurement]]:
    """Measure every key (variant) at every point, in the order given (smallest point first).

    A key that runs out of memory or past the budget is marked so and dropped from the larger
    points (marked "skipped" there, with the reason); an error or a failed check is repeated at the
    larger points without running. A key whose projected time per call (``project_seconds``) exceeds
    ``budget_s`` is marked "timeout" without running; ``size(point)`` is the work measure the
    projection scales by (e.g. pixels x batch). ``log`` sees every result as it comes.
    """
    stopped: dict[K, Measurement] = {}
    history: dict[K, list[tuple[float, float]]] = {}
    out: list[tuple[K, P, Measurement]] = []
    for point in points:
        for key in keys:
            if key in stopped:
                out.append((key, point, dataclasses.replace(stopped[key])))
                if log is not None:
                    log(key, point, out[-1][2])
                continue
            projected = project_seconds(history.get(key, []), size(point))
            if projected is not None and projected > budget_s:
                m = Measurement(TIMEOUT, note=f"projected {projected:.1f} s per call > budget {budget_s:g} s")
            else:
                m = run(key, point)
            out.append((key, point, m))
            if log is not None:
                log(key, point, m)
            if m.ok and m.seconds is not None:
                history.setdefault(key, []).append((size(point), m.seconds))
            elif m.status in STOPPING:
                status = SKIPPED if m.status in (OOM, TIMEOUT) else m.status
                note = f"after {m.status} at {describe(point)}" if status == SKIPPED else m.note
                stopped[key] = Measurement(status, note=note)
    return out


def fit_loglog_slope(x: Sequence[float], y: Sequence[float | None], min_x: float = 0.0) -> float | None:
    """Least-squares slope of log(y) against log(x) (numpy.polyfit) over points with x >= min_x and a
    positive y; None with fewer than two distinct such x."""
    pts = [(a, b) for a, b in zip(x, y, strict=True) if a >= min_x and b is not None and b > 0]
    if len({a for a, _ in pts}) < 2:
        return None
    lx, ly = np.log([a for a, _ in pts]), np.log([b for _, b in pts])
    return float(np.polyfit(lx, ly, 1)[0])


# ----------------------------------------------------------------------------------------------------------
# Quick correctness checks (a benchmark refuses to report a variant that computes something else)
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 inside the block, restoring the settings after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to dtype, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or Inf."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if out64.shape != ref64.shape or not torch.isfinite(out64).all():
        return math.inf
    return (out64 - ref64).norm().item() / max(ref64.norm().item(), 1e-30)


def forward_backward(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype,
                     cast_input: bool = True, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, input gradient) of module(x) under autocast to dtype (x cast to dtype first when
    ``cast_input``), backpropagating a seeded random gradient (the same values for every module and dtype)."""
    leaf = (x.detach().to(dtype) if cast_input else x.detach().clone()).requires_grad_(True)
    with autocast(x.device, dtype):
        out = module(leaf)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen, device=x.device, dtype=torch.float32).to(out.dtype)
    out.backward(grad)
    return out.detach().float(), leaf.grad.detach().float()


def lowp_bound(own_error: float) -> float:
    """The low-precision sanity bound, given the reference's own low-precision error against fp32."""
    return LOWP_CHECK_FACTOR * own_error + LOWP_CHECK_FLOOR


@dataclasses.dataclass
class CheckResult:
    passed: bool
    detail: str
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    bounds: dict[str, float] = dataclasses.field(default_factory=dict)


def check_against_reference(candidate: Callable[[torch.Tensor], torch.Tensor],
                            reference: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            low_precision: torch.dtype | None = None, cast_input: bool = True) -> CheckResult:
    """Compare candidate(x) with reference(x): output and input gradient.

    fp32 with TF32 off: relative error <= FP32_CHECK_RTOL. With ``low_precision`` (bf16), also the
    sanity bound: the candidate's low-precision error against the fp32 reference is at most
    LOWP_CHECK_FACTOR x the reference's own low-precision error + LOWP_CHECK_FLOOR. Any exception
    (e.g. a fused path that cannot run) fails the check with its message. ``cast_input``: whether x
    itself is cast to the low precision (a block's input) or stays fp32 (a model's image).
    """
    errors: dict[str, float] = {}
    bounds: dict[str, float] = {}
    try:
        with no_tf32():
            ref32 = forward_backward(reference, x, torch.float32)
            got32 = forward_backward(candidate, x, torch.float32)
        for name, got, ref in zip(("output", "input grad"), got32, ref32, strict=True):
            errors[f"{name} fp32"], bounds[f"{name} fp32"] = relative_error(got, ref), FP32_CHECK_RTOL
        if low_precision is not None:
            tag = str(low_precision).removeprefix("torch.")
            ref_lp = forward_backward(reference, x, low_precision, cast_input)
            got_lp = forward_backward(candidate, x, low_precision, cast_input)
            for name, got, ref, own in zip(("output", "input grad"), got_lp, ref32, ref_lp, strict=True):
                errors[f"{name} {tag}"] = relative_error(got, ref)
                bounds[f"{name} {tag}"] = lowp_bound(relative_error(own, ref))
    except Exception as exc:
        return CheckResult(False, f"check could not run: {describe_error(exc)}", errors, bounds)
    failed = [k for k in errors if not errors[k] <= bounds[k]]
    summary = ", ".join(f"{k} {errors[k]:.1e} (<= {bounds[k]:.1e})" for k in errors)
    if failed:
        return CheckResult(False, "relative error over the bound: " + summary, errors, bounds)
    return CheckResult(True, summary, errors, bounds)


def check_batches(candidate: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                  make_input: Callable[[int], torch.Tensor], batches: Sequence[int] = (1, 2),
                  low_precision: torch.dtype | None = None, cast_input: bool = True) -> CheckResult:
    """``check_against_reference`` at each batch size (B = 1 and B > 1 fail in different ways); the first
    failure, or all errors with a ``B=<b>`` prefix."""
    errors: dict[str, float] = {}
    bounds: dict[str, float] = {}
    details = []
    for batch in batches:
        result = check_against_reference(candidate, reference, make_input(batch), low_precision, cast_input)
        if not result.passed:
            return CheckResult(False, f"B={batch}: {result.detail}", result.errors, result.bounds)
        errors.update({f"B={batch} {k}": v for k, v in result.errors.items()})
        bounds.update({f"B={batch} {k}": v for k, v in result.bounds.items()})
        details.append(f"B={batch}: {result.detail}")
    return CheckResult(True, "; ".join(details), errors, bounds)


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", nargs="?", const=str(RESULTS_ROOT), default=None, metavar="ROOT",
        help="results root; files go to ROOT/<card>/ (default on a GPU: benchmarks/results/<card>/). "
             f"Without a GPU files are written only when --out is given, to ROOT/{CPU_DEMO_DIR_NAME}/ "
             "(--out alone: benchmarks/results/cpu-demo/)",
    )


def output_dir(out: str | None, env: Mapping[str, Any]) -> Path | None:
    """Where results go: ROOT/<card slug>/ on a GPU; ROOT/cpu-demo/ (git-ignored) on a CPU, only with --out."""
    if env["label"] == CPU_DEMO_LABEL:
        if out is None:
            return None
        path = Path(out) / CPU_DEMO_DIR_NAME
        path.mkdir(parents=True, exist_ok=True)
        (path / ".gitignore").write_text("# CPU demonstrations are not results: never committed\n*\n")
        return path
    path = Path(out or RESULTS_ROOT) / env["card_slug"]
    path.mkdir(parents=True, exist_ok=True)
    return path


def jsonable(value: Any) -> Any:
    """value with non-finite floats as None, tuples as lists and unknown objects as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(jsonable(payload), indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], env: Mapping[str, Any]) -> None:
    """One row per measurement, the environment record repeated in every row (columns ``env_*``)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    columns += [f"env_{k}" for k in env]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(jsonable({**row, **{f"env_{k}": v for k, v in env.items()}}))


# ----------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:,.0f} ms"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.2f}x"


def fmt_range(lo: float | None, hi: float | None) -> str:
    """A spread such as an interquartile range, in ms."""
    if lo is None or hi is None:
        return "-"
    return f"{fmt_ms(lo).removesuffix(' ms')}-{fmt_ms(hi)}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bench_ms(fn: Callable[[], object], grads_to_clear: Sequence[torch.Tensor], device: torch.device,
             rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) milliseconds per call of fn, the tensors' .grad cleared before each call:
    triton's do_bench (CUDA events, L2 flushed) on a GPU, three host-timed calls elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=list(grads_to_clear), quantiles=[0.5, 0.25, 0.75])
        return float(q[0]), float(q[1]), float(q[2])
    times = []
    for _ in range(3):
        for t in grads_to_clear:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q25, q50, q75 = np.percentile(times, [25, 50, 75]).tolist()
    return q50, q25, q75


def peak_bytes(fn: Callable[[], object], grads_to_clear: Sequence[torch.Tensor], device: torch.device) -> int | None:
    """The allocator's peak during one call of fn above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    for t in grads_to_clear:
        t.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
