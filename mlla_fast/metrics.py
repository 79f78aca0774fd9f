"""Volume metrics: Dice and the 95th-percentile Hausdorff distance, and their two empty-class conventions.

Surfaces and HD95 follow the usual definition (as in medpy, which the released evaluation calls):
a mask's surface is the mask minus its binary erosion (6-connected in 3-D), the directed surface
distances are read from a Euclidean distance transform of the other mask's surface complement
(``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``), and HD95 is the 95th
percentile of both directions' distances together.

Conventions for a foreground class (SPEC §5):

- ``released``: both masks non-empty -> (Dice, HD95); prediction non-empty but truth empty ->
  (1, 0); otherwise (0, 0). These are the numbers the paper compares.
- ``present``: a class absent from the ground truth scores NaN and is left out of the means;
  a class present in the truth but missed by the prediction scores Dice 0 and HD95 = the
  volume's diagonal (the largest distance possible inside it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

CONVENTIONS = ("released", "present")
HD_PERCENTILE = 95.0


def dice_coefficient(pred: np.ndarray, truth: np.ndarray) -> float:
    """2·|P ∩ T| / (|P| + |T|) of two boolean masks of one shape; NaN when both are empty."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"masks must have one shape, got {pred.shape} and {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union grown by one voxel (distances unchanged)."""
    nonzero = np.nonzero(a | b)
    box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in nonzero)
    return a[box], b[box]


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances from every surface voxel of mask ``a`` to the nearest surface voxel of mask ``b``.

    Both masks non-empty, one shape; ``spacing`` per axis (default 1: distances in voxels).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks must have one shape, got {a.shape} and {b.shape}")
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    a, b = _crop_to_union(a, b)
    sampling = None if spacing is None else [float(s) for s in spacing]
    if sampling is not None and len(sampling) != a.ndim:
        raise ValueError(f"spacing must have {a.ndim} entries, got {spacing!r}")
    distance_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=sampling)
    return distance_to_b[_surface(a)]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance of two non-empty masks (mm with spacing, else voxels)."""
    both = np.concatenate([surface_distances(pred, truth, spacing), surface_distances(truth, pred, spacing)])
    return float(np.percentile(both, HD_PERCENTILE))


def class_scores(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], convention: str) -> dict[str, float]:
    """Dice, HD95 in mm and HD95 in voxels of one class's boolean masks under a convention (module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if has_pred and has_truth:
        return {"dice": dice_coefficient(pred, truth), "hd95_mm": hd95(pred, truth, spacing),
                "hd95_vox": hd95(pred, truth)}
    if convention == "released":
        value = 1.0 if has_pred else 0.0
        return {"dice": value, "hd95_mm": 0.0, "hd95_vox": 0.0}
    if not has_truth:
        return {"dice": math.nan, "hd95_mm": math.nan, "hd95_vox": math.nan}
    extent = np.asarray(truth.shape, dtype=np.float64)
    return {"dice": 0.0, "hd95_mm": float(np.linalg.norm(extent * np.asarray(spacing, dtype=np.float64))),
            "hd95_vox": float(np.linalg.norm(extent))}


def case_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float],
                convention: str) -> dict[int, dict[str, float]]:
    """Scores of every foreground class 1..K-1 of one case: {class index: class_scores(...)}.

    ``pred`` and ``truth`` are integer label maps of one shape (e.g. (X, Y, Z)); ``spacing`` in mm per axis.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} must have one shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing must have {pred.ndim} entries, got {spacing!r}")
    return {c: class_scores(pred == c, truth == c, spacing, convention) for c in range(1, num_classes)}


def foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float]:
    """Dice of classes 1..K-1 of two label maps, NaN for a class absent from ``truth`` (the present convention)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} must have one shape")
    out = []
    for c in range(1, num_classes):
        t = truth == c
        out.append(dice_coefficient(pred == c, t) if t.any() else math.nan)
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(per_case: Mapping[str, Mapping[int, Mapping[str, float]]], class_names: Sequence[str]) -> dict:
    """Mean over cases per class (NaN entries left out), then the mean over classes of those means.

    ``per_case``: {case id: case_scores(...)}. Returns {"classes": {name: {metric: mean}}, "mean":
    {metric: mean over classes}}; a metric with no value anywhere is NaN.
    """
    metrics = ("dice", "hd95_mm", "hd95_vox")
    classes: dict[str, dict[str, float]] = {}
    for c in range(1, len(class_names)):
        rows = [scores[c] for scores in per_case.values()]
        classes[class_names[c]] = {m: nanmean([r[m] for r in rows]) for m in metrics}
    mean = {m: nanmean([v[m] for v in classes.values()]) for m in metrics}
    return {"classes": classes, "mean": mean}
