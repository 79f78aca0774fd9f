"""``mlla-fast train``: the authors' training recipe (SPEC §5) without the released code's bugs (SPEC §4).

AdamW (weight decay 0.01; PyTorch's fused implementation on CUDA), cosine schedule from ``lr`` (used as
given) to 1e-6 stepped every iteration, loss ``w_ce·CE + w_dice·soft Dice`` with the dataset's weights, 2-D
axial slices with the released augmentation. Every ``val_every`` iterations the model predicts the 'val' split's
volumes (never 'test') and goes back to train mode; ``RUN/last.pt`` and (on a new best mean
foreground Dice) ``RUN/best.pt`` are written atomically. ``--resume`` continues from
``RUN/last.pt`` exactly: model, optimiser, scheduler, every RNG state and the iteration, from
which the data order follows (:mod:`mlla_fast.sampler`), so a killed and resumed run ends with
the weights of an uninterrupted one.

Several GPUs: ``torchrun --nproc_per_node=N -m mlla_fast train ...`` trains with
DistributedDataParallel (NCCL; gloo on CPU); ``--batch-size`` is the global batch, split over
the processes; only rank 0 writes to RUN.

``--cuda-graph`` (one process, CUDA): the whole step (forward, loss, backward, AdamW) is captured once
as a CUDA graph and replayed every iteration, removing the host's launch overhead, which bounds small
models such as MLLA-UNet-T. The optimizer is AdamW with ``capturable=True`` and its learning rate a
device tensor that the schedule updates in place; the capture's warm-up steps are undone
(:func:`mlla_fast.graphs.preserved_training_state`), so the run trains the same steps from the same
state, and a killed run resumes as it does without a graph. A non-finite loss is seen only after the
graph has applied that step: training stops and nothing of it is saved (RUN keeps the last good
checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from .backend import BACKENDS
from .data import DataError, SliceDataset, VolumeDataset, get_dataset_spec, load_manifest
from .distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    init_distributed,
    shutdown_distributed,
)
from .graphs import GraphedStep, preserved_training_state
from .inference import autocast, predict_volume
from .losses import DiceCELoss
from .metrics import foreground_dice, nanmean
from .reference.unet import MODEL_CONFIGS, load_imagenet_pretrained
from .runs import (
    CHECKPOINT_FORMAT,
    MetricLogger,
    RunError,
    TrainConfig,
    build_model,
    check_writable,
    checkpoint_path,
    load_checkpoint,
    load_config,
    rng_state,
    save_checkpoint,
    save_config,
    seed_everything,
    set_rng_state,
)
from .sampler import BatchStream, EpochIndexed

VAL_BATCH = 16


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing the bad state."""


def resolve_resume(saved: TrainConfig, requested: dict[str, Any]) -> TrainConfig:
    """The saved config of a run to resume, with the settings that may change taken from ``requested``.

    ``requested`` holds only the settings the user gave; a setting that determines the weights
    (``TrainConfig.DETERMINING``) must match the saved one, or RunError says which differ.
    """
    changed = [k for k in TrainConfig.DETERMINING if k in requested and requested[k] != getattr(saved, k)]
    if changed:
        details = ", ".join(f"{k}: saved {getattr(saved, k)!r}, given {requested[k]!r}" for k in changed)
        raise RunError(f"--resume continues the saved run, whose settings differ from those given ({details}); "
                       "drop those flags or train into a new --out")
    return TrainConfig.from_dict({**saved.to_dict(), **requested})


def validate(model: nn.Module, val_set: VolumeDataset, config: TrainConfig, ctx: DistContext) -> dict[str, float]:
    """Mean foreground Dice on the val volumes (each process predicts its share) and per class.

    The model is put in eval mode for the prediction and returned to the mode it was in.
    """
    per_case = []
    for index in range(ctx.rank, len(val_set), ctx.world_size):
        case = val_set[index]
        if case["label"] is None:
            continue
        pred = predict_volume(model, case["image"], config.image_size, ctx.device, VAL_BATCH)
        per_case.append(foreground_dice(pred, case["label"], val_set.num_classes))
    rows = [row for part in all_gather_objects(per_case, ctx) for row in part]
    names = val_set.class_names[1:]
    per_class = {f"dice_{name}": nanmean([r[c] for r in rows]) for c, name in enumerate(names)}
    return {"dice": nanmean(list(per_class.values())), **per_class}


def _check_dataset_name(config: TrainConfig, manifest: dict) -> None:
    if config.dataset is None:
        return
    try:
        expected = get_dataset_spec(config.dataset).name
    except ValueError:
        expected = config.dataset
    if expected != manifest["dataset"]:
        raise RunError(f"--dataset {config.dataset} was given, but {config.data} holds the prepared "
                       f"'{manifest['dataset']}' dataset")


def _checkpoint_state(model: nn.Module, optimizer, scheduler, iteration: int, best: dict, config: TrainConfig,
                      ctx: DistContext, class_names: list[str]) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best_dice": best["dice"],
        "best_iteration": best["iteration"],
        "rng": all_gather_objects(rng_state(), ctx),
        "world_size": ctx.world_size,
        "config": config.to_dict(),
        "class_names": class_names,
    }


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Train (or with ``resume`` continue) the run ``config.out``; returns a summary dict.

    Joins the torchrun process group when started by torchrun. Raises DataError (data folder
    missing or unprepared), RunError (run folder unwritable, already used, or inconsistent with a
    resume), TrainingDiverged (non-finite loss; RUN keeps the last good checkpoint).
    ``progress`` None shows a progress bar when the output is a terminal.
    """
    ctx = init_distributed(config.device)
    try:
        return _train(config, resume, progress, ctx)
    finally:
        shutdown_distributed()


def _train(config: TrainConfig, resume: bool, progress: bool | None, ctx: DistContext) -> dict[str, Any]:
    config.validate()
    if config.cuda_graph:
        _check_graph_setting(ctx)
    run_dir = check_writable(config.out, tag=f".rank{ctx.rank}")
    if not resume and checkpoint_path(run_dir, "last").exists():
        raise RunError(f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out")
    manifest = load_manifest(config.data)
    _check_dataset_name(config, manifest)
    train_set = SliceDataset(config.data, "train", config.image_size, augment=True, seed=config.seed)
    val_set = VolumeDataset(config.data, "val")
    num_classes = train_set.num_classes
    if config.loss_weights is None:
        config.loss_weights = [float(w) for w in manifest["loss_weights"]]
    if len(val_set) == 0 and ctx.is_main:
        warnings.warn(f"{config.data} has no 'val' cases: no validation, no best.pt (only last.pt)", stacklevel=2)

    seed_everything(config.seed)
    model = build_model(config, num_classes).to(ctx.device)
    if config.pretrained and not resume:
        loaded, _ = load_imagenet_pretrained(model, config.pretrained)
        if ctx.is_main:
            tqdm.write(f"ImageNet initialisation from {config.pretrained}: {len(loaded)} tensors loaded")
    # On CUDA PyTorch's fused AdamW: one kernel per group of tensors instead of the foreach implementation's dozen
    # passes (on an H200, ~1.9 ms of a 30 ms MLLA-UNet-T step at 224², batch 48, in 86 multi-tensor launches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=ctx.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations, eta_min=config.min_lr)
    best = {"dice": -math.inf, "iteration": None}
    start = 0
    if resume:
        state = load_checkpoint(run_dir, "last")  # on the CPU: RNG states must stay CPU tensors
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
        best = {"dice": float(state["best_dice"]), "iteration": state["best_iteration"]}
        if state["world_size"] == ctx.world_size:
            set_rng_state(state["rng"][ctx.rank])
        else:
            warnings.warn(f"resuming a {state['world_size']}-process run with {ctx.world_size} processes: the "
                          "random draws (drop path) differ from an uninterrupted run", stacklevel=2)
            seed_everything(config.seed + 7919 * start + ctx.rank)
    else:
        seed_everything(config.seed + ctx.rank)
    if ctx.is_main:
        save_config(run_dir, config, manifest)
    _set_capturable(optimizer, config.cuda_graph, ctx.device)

    net = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    criterion = DiceCELoss(num_classes, config.loss_weights)
    sampler = BatchStream(len(train_set), config.batch_size, config.seed, stop=config.iterations, start=start,
                          rank=ctx.rank, world_size=ctx.world_size)
    loader = DataLoader(EpochIndexed(train_set), batch_sampler=sampler, num_workers=config.workers,
                        pin_memory=ctx.device.type == "cuda", generator=torch.Generator())
    logger = MetricLogger(run_dir, enabled=ctx.is_main, keep_until=start if resume else None)
    bar = tqdm(total=config.iterations, initial=start, desc="train", unit="it", dynamic_ncols=True,
               disable=True if not ctx.is_main else (None if progress is None else not progress))

    def checkpoint(iteration: int) -> None:
        scores: dict[str, float] = {}
        if len(val_set):
            broadcast_buffers(model, ctx)
            scores = validate(model, val_set, config, ctx)
            logger.log("val", iteration, scores)
            if scores["dice"] > best["dice"]:
                best.update(dice=scores["dice"], iteration=iteration)
        state = _checkpoint_state(model, optimizer, scheduler, iteration, best, config, ctx, train_set.class_names)
        if ctx.is_main:
            save_checkpoint(state, checkpoint_path(run_dir, "last"))
            if best["iteration"] == iteration:
                save_checkpoint(state, checkpoint_path(run_dir, "best"))
            if scores:
                bar.write(f"iteration {iteration}/{config.iterations}: val Dice {scores['dice']:.4f} "
                          f"(best {best['dice']:.4f} at {best['iteration']})")
        barrier(ctx)

    def forward_backward(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(ctx.device):
            logits = net(images)
        loss = criterion(logits, labels)
        loss.backward()
        return loss.detach()

    def graph_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = forward_backward(images, labels)
        optimizer.step()
        return loss

    began = time.monotonic()
    window = {"loss": 0.0, "count": 0, "images": 0, "since": time.monotonic()}
    iteration = start
    stopped = "completed"
    graphed = None
    try:
        for images, labels in loader:
            images = images.to(ctx.device, non_blocking=True)
            labels = labels.to(ctx.device, non_blocking=True)
            if config.cuda_graph:
                if graphed is None:
                    with preserved_training_state(model, optimizer):
                        graphed = GraphedStep(graph_step, images, labels)
                loss = graphed(images, labels)
            else:
                loss = forward_backward(images, labels)
            out_of_time = config.max_minutes is not None and time.monotonic() - began > 60 * config.max_minutes
            flags = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float(),
                                 torch.tensor(float(out_of_time), device=loss.device)])
            loss_sum, bad, timeout = all_reduce_sum(flags, ctx).tolist()
            if bad:
                kept = checkpoint_path(run_dir, "last")
                where = f"the last good checkpoint is {kept}" if kept.exists() else "no checkpoint was written"
                applied = ("the CUDA graph had already applied that step in memory; nothing of it was saved"
                           if config.cuda_graph else "training stopped without applying that step")
                raise TrainingDiverged(f"the loss became {loss.item()} at iteration {iteration + 1}; {applied}; "
                                       f"{where}")
            lr = float(optimizer.param_groups[0]["lr"])
            if not config.cuda_graph:
                optimizer.step()
            scheduler.step()
            iteration += 1
            bar.update()
            window["loss"] += loss_sum / ctx.world_size
            window["count"] += 1
            window["images"] += config.batch_size
            if iteration % config.log_every == 0 or iteration == config.iterations:
                now = time.monotonic()
                mean_loss = window["loss"] / window["count"]
                logger.log("train", iteration, {"loss": mean_loss, "lr": lr,
                                                "images_per_s": window["images"] / max(now - window["since"], 1e-9),
                                                "elapsed_s": now - began})
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}")
                window.update(loss=0.0, count=0, images=0, since=now)
            if timeout:
                stopped = f"time limit of {config.max_minutes} minutes"
                checkpoint(iteration)
                break
            if iteration % config.val_every == 0 or iteration == config.iterations:
                checkpoint(iteration)
    finally:
        bar.close()
        logger.close()
    return {"run": str(run_dir), "iteration": iteration, "iterations": config.iterations, "stopped": stopped,
            "best_dice": best["dice"] if best["iteration"] is not None else None,
            "best_iteration": best["iteration"], "seconds": time.monotonic() - began}


def _check_graph_setting(ctx: DistContext) -> None:
    """ValueError unless a CUDA graph can capture this run's step: one process, on a CUDA device."""
    if ctx.device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, but this run trains on {ctx.device.type}; "
                         "leave out --cuda-graph")
    if ctx.distributed:
        raise ValueError(f"--cuda-graph trains in one process, but this run has {ctx.world_size} "
                         "(torchrun); leave out --cuda-graph for DistributedDataParallel")


def _set_capturable(optimizer: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """Put AdamW in the form a CUDA graph needs (capturable, learning rate and step counts as device tensors),
    or in the plain form: a fresh optimizer is plain, and a resumed run may have been saved in either."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if capturable else lr
    # fused AdamW keeps its step counts on the device in either form
    on_device = capturable or any(group.get("fused") for group in optimizer.param_groups)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(
                device if on_device else torch.device("cpu"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mlla-fast train``; unset flags take the recipe's value (or, with --resume, the run's)."""
    recipe = TrainConfig(data="", out="")
    parser.add_argument("--data", type=Path, help="prepared dataset folder (from `mlla-fast prepare`)")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write (config, logs, checkpoints)")
    parser.add_argument("--dataset", help="dataset name, checked against the prepared folder's")
    parser.add_argument("--config", dest="model", choices=sorted(MODEL_CONFIGS),
                        help=f"model size (default {recipe.model})")
    parser.add_argument("--model-args", type=json.loads, metavar="JSON",
                        help='overrides of the model config, e.g. \'{"embed_dim": 32, "depths": [1, 1, 1, 1]}\'')
    parser.add_argument("--iterations", type=int, help=f"training iterations (default {recipe.iterations})")
    parser.add_argument("--batch-size", type=int, help=f"global batch size (default {recipe.batch_size})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate, used as given (default {recipe.lr})")
    parser.add_argument("--min-lr", type=float, help=f"final learning rate of the cosine (default {recipe.min_lr})")
    parser.add_argument("--image-size", type=int, help=f"training slice size (default {recipe.image_size})")
    parser.add_argument("--val-every", type=int,
                        help=f"validate and checkpoint every K iterations (default {recipe.val_every})")
    parser.add_argument("--log-every", type=int, help=f"log the loss every K iterations (default {recipe.log_every})")
    parser.add_argument("--workers", type=int, help=f"data loading processes (default {recipe.workers})")
    parser.add_argument("--seed", type=int, help=f"seed of the data order and initialisation (default {recipe.seed})")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--backend", choices=BACKENDS, help=f"MLLA block kernels (default {recipe.backend})")
    parser.add_argument("--pretrained", help="ImageNet MLLA-T checkpoint (MLLA_T.pth) to initialise from")
    parser.add_argument("--loss-weights", type=float, nargs=2, metavar=("CE", "DICE"),
                        help="loss weights (default: the dataset's, from the manifest)")
    parser.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="capture the training step in one CUDA graph (one process on CUDA; faster for small "
                             "models, whose steps are bound by launch overhead)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """(TrainConfig, resume) from parsed flags: the recipe, or the saved run, updated with the flags given."""
    names = ("data", "dataset", "model", "model_args", "iterations", "batch_size", "lr", "min_lr", "image_size",
             "val_every", "log_every", "workers", "seed", "device", "backend", "pretrained", "loss_weights",
             "max_minutes", "cuda_graph")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    for key in ("data", "pretrained"):
        if key in given:
            given[key] = str(given[key])
    if "loss_weights" in given:
        given["loss_weights"] = [float(w) for w in given["loss_weights"]]
    given["out"] = str(args.out)
    if args.resume:
        return resolve_resume(load_config(args.out), given), True
    if "data" not in given:
        raise RunError("--data PREPARED is required (a folder written by `mlla-fast prepare`)")
    return TrainConfig.from_dict(given), False


def run(args: argparse.Namespace) -> int:
    """Train from the command line; exit status 2 for a usage or data problem, 3 when the loss diverged."""
    try:
        config, resume = config_from_args(args)
        summary = train(config, resume=resume)
    except (DataError, RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best_dice"]
        best_text = f"best val Dice {best:.4f} at iteration {summary['best_iteration']}" if best is not None else \
            "no validation split"
        print(f"trained {summary['iteration']}/{summary['iterations']} iterations ({summary['stopped']}) in "
              f"{summary['seconds']:.0f} s; {best_text}; run folder {summary['run']}")
    return 0
