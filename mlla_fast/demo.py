"""``mlla-fast demo``: the whole pipeline on the built-in phantom, in a few minutes, on any machine.

Writes the synthetic CT-like phantom (:mod:`mlla_fast.data.phantom`), prepares it, trains
MLLA-UNet within the time budget, evaluates the held-out test cases, prints the per-class Dice /
HD95 table and writes overlays. On CPU it trains a reduced MLLA-UNet (the tiny config with
32 channels and one block per stage) at 96x96; on a GPU the tiny config at 224x224 with the
fused kernels. The number of iterations is set from a short timing of the training step so that
training fits the budget; a time limit stops it early if the machine slows down.

Everything goes under ``--out`` (default ``./mlla-fast-demo``): ``phantom/`` (NIfTI),
``prepared/``, ``run/`` (config, logs, checkpoints) and ``run/eval_test_best/`` (metrics,
predictions, overlays). Running the demo again into the same folder replaces its run.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .backend import BACKENDS
from .data import DataError, make_phantom, prepare_dataset
from .distributed import resolve_device
from .evaluate import evaluate_run, format_table
from .inference import autocast
from .losses import DiceCELoss
from .runs import CONFIG_NAME, RunError, TrainConfig, build_model, check_writable
from .train import train

PHANTOM_CASES = 12
CPU_MODEL = {"embed_dim": 32, "depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}
SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {"model_args": CPU_MODEL, "image_size": 96, "batch_size": 8, "lr": 2e-3, "workers": 0},
    "cuda": {"model_args": {}, "image_size": 224, "batch_size": 24, "lr": 1e-3, "workers": 4},
}
MIN_ITERATIONS, MAX_ITERATIONS = 60, 3000
TRAIN_SHARE = 0.85  # of the time left after data preparation; the rest is for evaluation
PLANNED_SHARE = 0.8  # of the training time that the planned iterations take; slack for a machine that slows down


def seconds_per_iteration(config: TrainConfig, num_classes: int, device: torch.device, steps: int = 3,
                          give_up_after: float = math.inf) -> float:
    """Time of one training step of ``config`` on random data (after one warm-up step).

    Returns inf once the measurement has taken more than ``give_up_after`` seconds.
    """
    began = time.perf_counter()
    model = build_model(config, num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    criterion = DiceCELoss(num_classes)
    x = torch.randn(config.batch_size, 1, config.image_size, config.image_size, device=device)
    y = torch.randint(0, num_classes, (config.batch_size, config.image_size, config.image_size), device=device)
    start = 0.0
    for step in range(steps + 1):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast(device):
            logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if time.perf_counter() - began > give_up_after:
            return math.inf
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def fastest_threads(config: TrainConfig, num_classes: int) -> tuple[int, float]:
    """Set torch's CPU thread count to whichever of 1 and the default trains faster; (threads, s per iteration).

    On a CPU shared with other busy processes, several threads per process can be many times
    slower than one, so the demo measures instead of assuming.
    """
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    timings = {1: seconds_per_iteration(config, num_classes, torch.device("cpu"))}
    if default > 1:
        torch.set_num_threads(default)
        # stop measuring once it is clearly slower than one thread (4 steps at twice the time)
        timings[default] = seconds_per_iteration(config, num_classes, torch.device("cpu"),
                                                 give_up_after=8 * timings[1])
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best, timings[best]


def run_demo(out: str | Path = "mlla-fast-demo", minutes: float = 5.0, device: str | None = None,
             backend: str | None = None, iterations: int | None = None, progress: bool | None = None) -> dict:
    """Phantom -> prepare -> train -> evaluate under ``out``; returns {"train": ..., "evaluation": ..., "seconds"}.

    ``iterations`` None fits the training into ``minutes`` (the whole demo's budget).
    """
    began = time.monotonic()
    out = check_writable(Path(out))
    raw, prepared, run_dir = out / "phantom", out / "prepared", out / "run"
    torch_device = resolve_device(device)
    print(f"[1/4] writing {PHANTOM_CASES} phantom cases to {raw}")
    make_phantom(raw, cases=PHANTOM_CASES, seed=0)
    print(f"[2/4] preparing them into {prepared}")
    manifest = prepare_dataset("phantom", raw, prepared, progress=progress is not False)
    if (run_dir / CONFIG_NAME).is_file():
        shutil.rmtree(run_dir)

    settings = SETTINGS[torch_device.type]
    config = TrainConfig(data=str(prepared), out=str(run_dir), dataset="phantom", device=torch_device.type,
                         backend=backend or "auto", val_every=10**9, **settings)
    if iterations is None:
        if torch_device.type == "cpu":
            threads, per_iteration = fastest_threads(config, manifest["num_classes"])
            timing = f"{threads} thread(s), {per_iteration:.2f} s per iteration measured, "
        else:
            per_iteration = seconds_per_iteration(config, manifest["num_classes"], torch_device)
            timing = f"{per_iteration:.2f} s per iteration measured, "
        budget = max(60 * minutes - (time.monotonic() - began), 0.0) * TRAIN_SHARE
        iterations = int(min(max(PLANNED_SHARE * budget / per_iteration, MIN_ITERATIONS), MAX_ITERATIONS))
        config.max_minutes = budget / 60
    else:
        timing = ""
    config.iterations = iterations
    config.val_every = -(-iterations // 4)  # four validations, the last at the end
    config.log_every = max(iterations // 50, 1)
    print(f"[3/4] training on {torch_device.type} ({timing}{iterations} iterations, batch {config.batch_size}, "
          f"{config.image_size}x{config.image_size}) into {run_dir}")
    trained = train(config, progress=progress)
    print(f"[4/4] evaluating the {len(manifest['splits']['test'])} held-out test cases")
    evaluation = evaluate_run(run_dir, "test", overlays=4, save_nifti=True, device=torch_device.type,
                              backend=backend, progress=progress)
    return {"train": trained, "evaluation": evaluation, "seconds": time.monotonic() - began,
            "paths": {"phantom": raw, "prepared": prepared, "run": run_dir, "evaluation": Path(evaluation["out"])}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mlla-fast demo``."""
    parser.add_argument("--out", type=Path, default=Path("mlla-fast-demo"), help="folder for everything it writes")
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget of the whole demo (default 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--backend", choices=BACKENDS, help="MLLA block kernels (default auto)")
    parser.add_argument("--iterations", type=int, help="train this many iterations instead of fitting the budget")


def run(args: argparse.Namespace) -> int:
    """Run the demo and report the Dice table and where everything went."""
    try:
        result = run_demo(args.out, args.minutes, args.device, args.backend, args.iterations)
    except (DataError, RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    evaluation, paths = result["evaluation"], result["paths"]
    print(f"\nphantom test cases, {evaluation['checkpoint']}.pt (iteration {evaluation['iteration']}), "
          f"{evaluation['convention_note']}")
    print(format_table(evaluation))
    print(f"\nmean foreground Dice {evaluation['mean']['dice']:.4f}; demo took {result['seconds'] / 60:.1f} minutes")
    print(f"phantom NIfTI:     {paths['phantom']}\nprepared data:     {paths['prepared']}\n"
          f"run (checkpoints): {paths['run']}\nmetrics, overlays: {paths['evaluation']}")
    return 0
