"""``mlla-fast evaluate``: Dice and HD95 of a trained run on whole volumes (SPEC §5).

Each volume of the split is predicted slice by slice (:func:`mlla_fast.inference.predict_volume`),
then every foreground class is scored per case (Dice, HD95 in mm and in voxels) under the chosen
empty-class convention (:mod:`mlla_fast.metrics`), averaged over cases per class and then over
classes. Written to ``RUN/eval_<split>_<checkpoint>/`` (or ``--out``): ``per_case_<convention>.csv``,
``summary_<convention>.json``, optionally ``predictions/<id>.nii.gz`` (on the prepared grid, with
its affine) and ``overlays/*.png`` (image, ground truth, prediction side by side).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import math
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .backend import BACKENDS
from .data import DataError, VolumeDataset
from .data.manifest import write_json_atomic
from .distributed import resolve_device
from .inference import predict_volume
from .metrics import CONVENTIONS, case_scores, summarize
from .runs import CHECKPOINTS, RunError, check_writable, load_trained_model

METRICS = ("dice", "hd95_mm", "hd95_vox")
HEADERS = {"dice": "Dice", "hd95_mm": "HD95 mm", "hd95_vox": "HD95 vox"}
CONVENTION_NOTES = {
    "released": "released convention: both masks non-empty -> (Dice, HD95); prediction only -> (1, 0); "
                "otherwise (0, 0)",
    "present": "present convention: classes absent from the ground truth are left out (NaN); a missed class "
               "scores Dice 0 and HD95 = the volume diagonal",
}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def format_table(summary: dict) -> str:
    """The summary as a text table: one row per class, then the mean; columns Dice, HD95 mm, HD95 vox."""
    rows = [*summary["classes"].items(), ("mean", summary["mean"])]
    width = max(len(name) for name, _ in rows) + 2
    lines = ["class".ljust(width) + "".join(HEADERS[m].rjust(10) for m in METRICS)]
    for name, values in rows:
        cells = "".join((f"{values[m]:.4f}" if m == "dice" else f"{values[m]:.2f}").rjust(10) for m in METRICS)
        lines.append(name.ljust(width) + cells)
    return "\n".join(lines)


def _display(slice_xy: np.ndarray) -> np.ndarray:
    # RAS (X right, Y anterior) shown radiologically: anterior up, the patient's right on the left.
    return slice_xy.T[::-1, ::-1]


def save_overlay(path: Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int,
                 spacing: tuple[float, float], title: str) -> None:
    """A PNG of one axial slice (X, Y): the image, the ground truth over it and the prediction over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = plt.get_cmap("tab20" if num_classes > 11 else "tab10")(np.arange(max(num_classes - 1, 1)))
    cmap = ListedColormap(colours)
    aspect = spacing[1] / spacing[0]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    for ax, (name, labels) in zip(axes, (("image", None), ("ground truth", truth), ("prediction", pred)), strict=True):
        ax.imshow(_display(image), cmap="gray", aspect=aspect, interpolation="nearest")
        if labels is not None:
            shown = np.ma.masked_equal(_display(labels).astype(np.int16), 0)
            ax.imshow(shown - 1, cmap=cmap, vmin=0, vmax=max(num_classes - 2, 1), alpha=0.55, aspect=aspect,
                      interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | Path | None = None,
                 convention: str = "released", checkpoint: str = "best", save_nifti: bool = False,
                 overlays: int = 0, device: str | None = None, out: str | Path | None = None,
                 batch_size: int = 32, backend: str | None = None, progress: bool | None = None) -> dict:
    """Evaluate a run's checkpoint on a split of its prepared data; returns the summary dict (also written).

    ``data`` defaults to the folder the run was trained on. Raises RunError (no run or checkpoint,
    output not writable, class names that differ from the run's) and DataError (data not prepared).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    model, config, manifest, state = load_trained_model(run_dir, checkpoint, torch_device, backend)
    volumes = VolumeDataset(data or config.data, split)
    if list(volumes.class_names) != list(manifest["class_names"]):
        raise RunError(f"the data's classes {volumes.class_names} differ from the run's {manifest['class_names']}")
    out_dir = check_writable(out or run_dir / f"eval_{split}_{checkpoint}")
    num_classes = volumes.num_classes
    names = volumes.class_names
    per_case: dict[str, dict[int, dict[str, float]]] = {}
    candidates: list[tuple[int, int, str, int]] = []
    slices: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]] = {}
    for index in tqdm(range(len(volumes)), desc=f"evaluate {split}", unit="case",
                      disable=None if progress is None else not progress):
        case = volumes[index]
        pred = predict_volume(model, case["image"], config.image_size, torch_device, batch_size)
        if save_nifti:
            (out_dir / "predictions").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(pred, case["affine"]), str(out_dir / "predictions" / f"{case['id']}.nii.gz"))
        if case["label"] is None:
            continue
        per_case[case["id"]] = case_scores(pred, case["label"], num_classes, case["spacing"], convention)
        if overlays > 0:
            foreground = (case["label"] > 0).sum(axis=(0, 1))
            for z in np.argsort(-foreground, kind="stable")[:overlays]:
                item = (int(foreground[z]), -index, case["id"], int(z))
                if len(candidates) < overlays:
                    heapq.heappush(candidates, item)
                elif item > candidates[0]:
                    dropped = heapq.heappushpop(candidates, item)
                    slices.pop((dropped[2], dropped[3]), None)
                else:
                    continue
                slices[(case["id"], int(z))] = (case["image"][:, :, z], case["label"][:, :, z], pred[:, :, z],
                                                case["spacing"][:2])
    if not per_case:
        raise RunError(f"split {split!r} of {data or config.data} has no labelled cases to evaluate")

    summary = summarize(per_case, names)
    summary.update(convention=convention, convention_note=CONVENTION_NOTES[convention], split=split,
                   cases=len(per_case), checkpoint=checkpoint, iteration=int(state["iteration"]),
                   run=str(run_dir), data=str(data or config.data))
    with open(out_dir / f"per_case_{convention}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "class", *METRICS])
        for case_id, scores in per_case.items():
            for c, values in scores.items():
                writer.writerow([case_id, names[c], *(f"{values[m]:.6g}" for m in METRICS)])
    write_json_atomic(out_dir / f"summary_{convention}.json", _json_safe(summary))
    if candidates:
        (out_dir / "overlays").mkdir(exist_ok=True)
        for _, _, case_id, z in sorted(candidates, reverse=True):
            image, truth, pred, spacing = slices[(case_id, z)]
            save_overlay(out_dir / "overlays" / f"{case_id}_z{z:03d}.png", image, truth, pred, num_classes,
                         spacing, f"{case_id}, slice z={z}")
    summary["out"] = str(out_dir)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mlla-fast evaluate``."""
    parser.add_argument("--run", type=Path, required=True, help="training run folder")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    parser.add_argument("--data", type=Path, help="prepared dataset (default: the one the run was trained on)")
    parser.add_argument("--convention", choices=CONVENTIONS, default="released",
                        help="empty-class scoring: 'released' (the paper's numbers) or 'present' (classes absent "
                             "from the ground truth left out); default released")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="default: best")
    parser.add_argument("--save-nifti", action="store_true", help="write the predicted label maps as NIfTI")
    parser.add_argument("--overlays", type=int, default=0, metavar="N",
                        help="write PNG overlays of the N slices with the most foreground")
    parser.add_argument("--out", type=Path, help="output folder (default RUN/eval_<split>_<checkpoint>)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--backend", choices=BACKENDS, help="MLLA block kernels (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")


def run(args: argparse.Namespace) -> int:
    """Evaluate from the command line and print the table; exit status 2 for a usage or data problem."""
    try:
        summary = evaluate_run(args.run, args.split, args.data, args.convention, args.checkpoint, args.save_nifti,
                               args.overlays, args.device, args.out, args.batch_size, args.backend)
    except (DataError, RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['run']}: {summary['checkpoint']}.pt (iteration {summary['iteration']}), split "
          f"{summary['split']}, {summary['cases']} case(s), {summary['convention_note']}")
    print(format_table(summary))
    print(f"results in {summary['out']}")
    return 0
