"""Geometry and intensity preprocessing shared by ``mlla-fast prepare`` and ``mlla-fast predict``.

A volume goes to the prepared grid in three steps, all undone by :func:`restore_to_source` for a
label map:

1. Reorientation to RAS+ (nibabel's ``as_closest_canonical``: axis permutations and flips only,
   no interpolation), so axial slices are ``[:, :, z]`` for every dataset.
2. Optional in-plane resampling to a target spacing (scipy.ndimage.zoom with ``grid_mode=True``:
   the volume's physical extent is kept; linear for images, nearest for labels). The slice
   axis is never resampled.
3. Intensity normalisation: CT is clipped to a window [lo, hi] and scaled to [0, 1] (the
   TransUNet line uses [-125, 275]); MRI is z-scored with the mean and standard deviation of
   the non-zero voxels (all voxels if none is zero), applied to every voxel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from .nifti import DataError, load_volume

ORIENTATION = "RAS"


def window_intensity(data: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Clip to ``window = (lo, hi)`` and scale linearly so lo -> 0 and hi -> 1 (float32)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"intensity window must have lo < hi, got ({lo}, {hi})")
    out = np.clip(np.asarray(data, dtype=np.float32), lo, hi)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return out


def zscore_intensity(data: np.ndarray) -> np.ndarray:
    """Subtract the mean and divide by the standard deviation of the non-zero voxels (float32).

    The statistics come from the non-zero voxels (all voxels when every voxel is zero or none
    is) and are applied to every voxel, so background zeros map to ``-mean / std``.
    """
    data = np.asarray(data, dtype=np.float32)
    foreground = data[data != 0]
    values = foreground if foreground.size else data.ravel()
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    if std == 0.0:
        std = 1.0
    return (data - np.float32(mean)) / np.float32(std)


def intensity_settings(modality: str, window: Sequence[float] | None) -> dict[str, Any]:
    """The manifest's ``intensity`` entry: how images are normalised for this modality."""
    if modality == "CT":
        if window is None:
            raise ValueError("a CT dataset needs an intensity window (lo, hi)")
        return {"method": "window", "window": [float(window[0]), float(window[1])], "range": [0.0, 1.0]}
    if modality == "MRI":
        return {"method": "zscore", "statistics": "nonzero voxels"}
    raise ValueError(f"modality must be 'CT' or 'MRI', got {modality!r}")


def normalize_intensity(data: np.ndarray, intensity: Mapping[str, Any]) -> np.ndarray:
    """Apply a manifest ``intensity`` entry (see :func:`intensity_settings`) to an image array."""
    method = intensity.get("method")
    if method == "window":
        return window_intensity(data, intensity["window"])
    if method == "zscore":
        return zscore_intensity(data)
    raise ValueError(f"unknown intensity method {method!r}; expected 'window' or 'zscore'")


@dataclass(frozen=True)
class Geometry:
    """How a source volume maps onto the prepared grid (RAS+, optionally resampled in-plane).

    ``ornt`` is nibabel's orientation transform from the source array axes to RAS+;
    ``canonical_shape`` the shape after reorientation; ``shape``, ``affine`` and ``spacing``
    describe the prepared array.
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    ornt: np.ndarray
    canonical_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def resampled(self) -> bool:
        return self.shape != self.canonical_shape


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def plan_geometry(
    source_shape: Sequence[int], source_affine: np.ndarray, in_plane_spacing: Sequence[float] | None = None
) -> Geometry:
    """Work out the prepared grid of a volume from its shape and affine alone.

    ``in_plane_spacing`` (sx, sy) in mm resamples the two in-plane axes of the RAS+ array; the
    new size is ``round(n * source_spacing / target_spacing)`` (at least 1), and the affine keeps
    the volume's physical extent (voxel edges stay where they were).
    """
    source_shape = tuple(int(n) for n in source_shape)
    source_affine = np.asarray(source_affine, dtype=np.float64)
    ornt = io_orientation(source_affine)
    canonical_shape = [0, 0, 0]
    for axis, (new_axis, _flip) in enumerate(ornt):
        canonical_shape[int(new_axis)] = source_shape[axis]
    canonical_affine = source_affine @ inv_ornt_aff(ornt, source_shape)
    shape = list(canonical_shape)
    affine = canonical_affine
    if in_plane_spacing is not None:
        current = _spacing(canonical_affine)
        scale = np.eye(4)
        for axis in (0, 1):
            target = float(in_plane_spacing[axis])
            if not target > 0:
                raise ValueError(f"in-plane spacing must be positive, got {tuple(in_plane_spacing)}")
            shape[axis] = max(1, round(canonical_shape[axis] * current[axis] / target))
            ratio = canonical_shape[axis] / shape[axis]
            scale[axis, axis] = ratio
            scale[axis, 3] = 0.5 * (ratio - 1.0)
        affine = canonical_affine @ scale
    return Geometry(
        source_shape=source_shape,
        source_affine=source_affine,
        ornt=ornt,
        canonical_shape=tuple(canonical_shape),
        shape=tuple(shape),
        affine=affine,
        spacing=_spacing(affine),
    )


def _zoom_to(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    if tuple(array.shape) == tuple(shape):
        return array
    factors = [n / m for n, m in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):
        raise RuntimeError(f"resampling produced shape {out.shape}, expected {tuple(shape)}")
    return out


def to_prepared_grid(array: np.ndarray, geometry: Geometry, order: int) -> np.ndarray:
    """Reorient a source-grid array to RAS+ and resample it in-plane (``order`` 1 image, 0 label)."""
    if tuple(array.shape) != geometry.source_shape:
        raise ValueError(f"array shape {tuple(array.shape)} does not match the source shape {geometry.source_shape}")
    canonical = apply_orientation(array, geometry.ornt)
    return np.ascontiguousarray(_zoom_to(canonical, geometry.shape, order))


def geometry_meta(geometry: Geometry) -> dict[str, Any]:
    """The geometry fields of a manifest case entry (JSON-ready lists)."""
    return {
        "shape": list(geometry.shape),
        "spacing": list(geometry.spacing),
        "affine": geometry.affine.tolist(),
        "source_shape": list(geometry.source_shape),
        "source_affine": geometry.source_affine.tolist(),
        "in_plane_resampled": geometry.resampled,
    }


def preprocess_image(
    img: nib.Nifti1Image, intensity: Mapping[str, Any], in_plane_spacing: Sequence[float] | None
) -> tuple[np.ndarray, Geometry]:
    """An in-memory image (see :func:`~mlla_fast.data.nifti.load_volume`) on the prepared grid.

    Returns the float32 (X, Y, Z) array after reorientation, resampling and intensity
    normalisation, and the :class:`Geometry` used.
    """
    geometry = plan_geometry(img.shape, img.affine, in_plane_spacing)
    data = np.asarray(img.dataobj, dtype=np.float32)
    array = normalize_intensity(to_prepared_grid(data, geometry, order=1), intensity)
    return np.ascontiguousarray(array, dtype=np.float32), geometry


def load_and_preprocess(path: str | Path, manifest: Mapping[str, Any] | str | Path) -> tuple[np.ndarray, dict]:
    """Load a raw NIfTI image and preprocess it exactly as ``mlla-fast prepare`` did for ``manifest``.

    ``manifest`` is a loaded manifest dict or a prepared folder. Returns the float32 array
    (X, Y, Z) on the prepared grid and ``meta``, a dict with the same fields as a manifest case
    entry (``shape``, ``spacing``, ``affine``, ``source_image``, ``source_shape``,
    ``source_affine``, ``in_plane_resampled``), which :func:`restore_to_source` takes.
    """
    if not isinstance(manifest, Mapping):
        from .manifest import load_manifest

        manifest = load_manifest(manifest)
    img = load_volume(path, "image")
    array, geometry = preprocess_image(img, manifest["intensity"], manifest.get("in_plane_spacing"))
    meta = geometry_meta(geometry)
    meta["source_image"] = str(path)
    return array, meta


def restore_to_source(label: np.ndarray, meta: Mapping[str, Any]) -> np.ndarray:
    """Put a label map (X, Y, Z) on the prepared grid back onto the source file's voxel grid.

    Undoes the in-plane resampling (nearest neighbour) and the reorientation, using ``meta``
    from :func:`load_and_preprocess` or a manifest case entry. The result has the source shape
    and the dtype of ``label``; save it with the source image's affine and header.
    """
    geometry = plan_geometry(meta["source_shape"], np.asarray(meta["source_affine"]))
    expected = tuple(int(n) for n in meta["shape"])
    label = np.asarray(label)
    if label.shape != expected:
        raise DataError(
            f"label map shape {label.shape} does not match the prepared shape {expected} of "
            f"{meta.get('source_image', 'the source image')}"
        )
    canonical = _zoom_to(label, geometry.canonical_shape, order=0)
    back = ornt_transform(axcodes2ornt(ORIENTATION), geometry.ornt)
    return np.ascontiguousarray(apply_orientation(canonical, back))
