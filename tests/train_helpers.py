"""Shared pieces of the training / evaluation tests: a tiny model, a tiny prepared phantom, CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mlla_fast.data import make_phantom, prepare_dataset

TINY_MODEL = {"embed_dim": 32, "depths": [1, 1, 1, 1], "depths_decoder": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}
REPO = Path(__file__).resolve().parents[1]


def make_prepared(root: Path, cases: int = 5, size: tuple[int, int] = (32, 6)) -> Path:
    """Phantom cases (3 train, 1 val, 1 test with the defaults) prepared into root/prepared."""
    make_phantom(root / "raw", cases=cases, seed=0, size=size)
    prepare_dataset("phantom", root / "raw", root / "prepared", progress=False)
    return root / "prepared"


def train_args(data: Path, out: Path, **overrides) -> list[str]:
    """``mlla-fast train`` arguments for a few-iteration run of the tiny model on CPU."""
    flags = {"data": data, "out": out, "model-args": json.dumps(TINY_MODEL), "iterations": 6, "batch-size": 4,
             "image-size": 32, "val-every": 3, "log-every": 1, "workers": 0, "lr": 2e-3, "device": "cpu",
             "backend": "torch", "seed": 0}
    flags.update({k.replace("_", "-"): v for k, v in overrides.items()})
    args = ["train"]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args


def cli_env(threads: int = 1) -> dict[str, str]:
    """Environment of a CLI subprocess: fixed thread count (bitwise reproducible, and kind to a shared CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("MLLA_FAST_BACKEND", None)
    return env


def run_cli(args: list[str], timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    """Run ``python -m mlla_fast ARGS`` in a subprocess and capture its output."""
    return subprocess.run([sys.executable, "-m", "mlla_fast", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=REPO, **popen)
