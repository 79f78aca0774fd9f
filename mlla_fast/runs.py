"""A training run's folder: resolved config, atomic checkpoints, metric logs and RNG states.

Layout of ``RUN/``::

    config.json      the resolved training config (TrainConfig), written when training starts
    manifest.json    a copy of the prepared dataset's manifest (class names, preprocessing)
    last.pt          the latest checkpoint (every ``val_every`` iterations and at the end)
    best.pt          the checkpoint with the best mean foreground validation Dice
    train_log.csv    iteration, loss, lr, images/s, elapsed seconds
    val_log.csv      iteration, mean foreground Dice on the 'val' split, then one column per class
    metrics.jsonl    every logged row, as JSON ({"kind": "train" | "val", ...})
    tensorboard/     the same scalars, when the tensorboard package is installed

Checkpoints hold plain containers and tensors only, so they load with ``torch.load(...,
weights_only=True)``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.manifest import write_json_atomic
from .model import MLLAUNet, create_model

CONFIG_NAME = "config.json"
MANIFEST_COPY = "manifest.json"
CHECKPOINTS = ("best", "last")
CHECKPOINT_FORMAT = 1
TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_log.csv"
JSONL_LOG = "metrics.jsonl"


class RunError(RuntimeError):
    """A run folder is missing, unwritable, or holds something other than what was asked for."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (SPEC §5 defaults: the authors' recipe).

    ``batch_size`` is the global batch (split evenly over the processes of a distributed run);
    ``lr`` is used as given; ``model_args`` overrides entries of the named model config (e.g. a
    smaller test model); ``loss_weights`` None takes the dataset's (w_ce, w_dice) from the
    manifest; ``device`` None picks CUDA when available; ``max_minutes`` stops training early
    (saving a checkpoint) once that much time has passed; ``cuda_graph`` captures the training step
    in one CUDA graph (one process on CUDA only; see :mod:`mlla_fast.graphs`).
    """

    data: str
    out: str
    dataset: str | None = None
    model: str = "tiny"
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    iterations: int = 30_000
    batch_size: int = 48
    lr: float = 0.004
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    image_size: int = 224
    val_every: int = 1000
    log_every: int = 20
    workers: int = 4
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    pretrained: str | None = None
    loss_weights: list[float] | None = None
    max_minutes: float | None = None
    cuda_graph: bool = False

    # Settings that determine the trained weights: a resumed run must keep them.
    DETERMINING = ("model", "model_args", "iterations", "batch_size", "lr", "min_lr", "weight_decay", "image_size",
                   "seed", "loss_weights")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RunError(f"unknown training settings {unknown}; expected a subset of {sorted(names)}")
        return cls(**dict(values))

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        positive = ("iterations", "batch_size", "val_every", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        if self.loss_weights is not None and len(self.loss_weights) != 2:
            raise ValueError(f"loss_weights must be [w_ce, w_dice], got {self.loss_weights}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")


def check_writable(folder: str | Path, tag: str = "") -> Path:
    """Create ``folder`` if needed and prove a file can be written and renamed in it; RunError if not.

    The probe's name carries ``tag`` and the process id, so that processes probing one folder at once
    (the ranks of a distributed run) never touch each other's probe."""
    folder = Path(folder)
    probe = folder / f".write_probe{tag}.{os.getpid()}"
    done = probe.with_name(probe.name + ".done")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        os.replace(probe, done)
        done.unlink()
    except OSError as exc:
        raise RunError(f"cannot write to the run folder {folder}: {exc}; choose another --out") from exc
    return folder


def save_config(run_dir: str | Path, config: TrainConfig, manifest: Mapping[str, Any]) -> None:
    """Write RUN/config.json and RUN/manifest.json (atomically)."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / CONFIG_NAME, config.to_dict())
    write_json_atomic(run_dir / MANIFEST_COPY, {k: v for k, v in manifest.items() if k != "root"})


def load_config(run_dir: str | Path) -> TrainConfig:
    """Read RUN/config.json; RunError saying how to make one when it is missing."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise RunError(f"{path} not found: {run_dir} is not a training run; train one with "
                       f"`mlla-fast train --data PREPARED --out {run_dir}`")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def load_run_manifest(run_dir: str | Path) -> dict:
    """The manifest copy a run saved (class names and the preprocessing to apply to new images)."""
    path = Path(run_dir) / MANIFEST_COPY
    if not path.is_file():
        raise RunError(f"{path} not found; the run folder {run_dir} is incomplete (train it again)")
    return json.loads(path.read_text())


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    if which not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {which!r}")
    return Path(run_dir) / f"{which}.pt"


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path, which: str = "best", map_location: str | torch.device = "cpu") -> dict:
    """Load RUN/best.pt or RUN/last.pt; RunError saying what exists when it is missing."""
    path = checkpoint_path(run_dir, which)
    if not path.is_file():
        present = [p.name for p in (checkpoint_path(run_dir, w) for w in CHECKPOINTS) if p.is_file()]
        hint = (f"it has {', '.join(present)}; pass --checkpoint {present[0].removesuffix('.pt')}" if present
                else "no checkpoint was written yet (train it, or resume it with `mlla-fast train --resume`)")
        raise RunError(f"no {path.name} in the run folder {run_dir}: {hint}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch and (current device's) CUDA RNG states, as checkpoint-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class MetricLogger:
    """Appends train and validation rows to CSV files, a JSONL file and (if installed) TensorBoard.

    ``enabled=False`` (the non-zero ranks of a distributed run) makes every call a no-op.
    ``keep_until`` (a resumed run's checkpoint iteration) first drops the rows a killed run
    logged after that checkpoint, so the logs read as one uninterrupted run.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, keep_until: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        if keep_until is not None:
            self._truncate(keep_until)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=keep_until)

    def _truncate(self, iteration: int) -> None:
        for name in (TRAIN_LOG, VAL_LOG):
            path = self.run_dir / name
            if path.is_file():
                with open(path, newline="") as f:
                    rows = list(csv.reader(f))
                kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= iteration]
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
        path = self.run_dir / JSONL_LOG
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["iteration"] <= iteration]
            path.write_text("".join(line + "\n" for line in kept))

    def _append_csv(self, name: str, header: Sequence[str], row: Sequence[Any]) -> None:
        path = self.run_dir / name
        new = not path.is_file() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(header)
            writer.writerow(row)

    def log(self, kind: str, iteration: int, values: Mapping[str, float]) -> None:
        """Log one row of ``kind`` "train" or "val" at ``iteration``."""
        if not self.enabled:
            return
        name = TRAIN_LOG if kind == "train" else VAL_LOG
        self._append_csv(name, ["iteration", *values], [iteration, *(f"{v:.6g}" for v in values.values())])
        with open(self.run_dir / JSONL_LOG, "a") as f:
            f.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{kind}/{key}", value, iteration)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def build_model(config: TrainConfig, num_classes: int, backend: str | None = None) -> MLLAUNet:
    """The MLLA-UNet a config describes (3 input channels, a 1-channel slice is repeated, as released)."""
    return create_model(config.model, num_classes=num_classes, in_chans=3, img_size=config.image_size,
                        backend=config.backend if backend is None else backend, **config.model_args)


def load_trained_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu",
                       backend: str | None = None) -> tuple[MLLAUNet, TrainConfig, dict, dict]:
    """(model in eval mode on ``device``, its TrainConfig, the run's manifest, the checkpoint) of a run."""
    config = load_config(run_dir)
    manifest = load_run_manifest(run_dir)
    state = load_checkpoint(run_dir, which)
    model = build_model(config, int(manifest["num_classes"]), backend)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, manifest, state
