"""Reading NIfTI volumes with checks whose errors name the file and the problem.

Every dataset file goes through :func:`load_volume` (one volume) and :func:`check_pair` (an image
and its label map), so a missing, truncated or inconsistent file fails the same way in every
reader and in ``mlla-fast prepare``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Image and label affines of one case written by different tools disagree in the last digits
# (float32 headers, qform vs sform); 0.01 mm and 1e-4 in the direction cosines is still "equal".
AFFINE_ATOL = 1e-2
AFFINE_RTOL = 1e-4


class DataError(ValueError):
    """A dataset folder or file is missing, unreadable or inconsistent; the message names it."""


def nifti_stem(path: str | Path) -> str:
    """The file name without its ``.nii.gz`` or ``.nii`` ending."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: str | Path) -> bool:
    """Whether the path names a NIfTI file (``.nii.gz`` or ``.nii``)."""
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists, else None."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_volume(path: str | Path, role: str = "image") -> nib.Nifti1Image:
    """Load one 3-D NIfTI volume fully into memory, checking that it is usable.

    A trailing singleton 4th axis (X, Y, Z, 1) is dropped. Raises :class:`DataError` naming the
    file for: a missing file, an unreadable or corrupt header, truncated or corrupt compressed
    data, a volume that is not 3-D, a zero-size axis, non-finite values, and (for ``role ==
    "image"``) a volume whose voxels all hold one value. Returns an in-memory image with the
    file's affine and header; its data is ``np.asanyarray(img.dataobj)`` (scaling applied).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} file not found: {path}")
    unreadable = (OSError, EOFError, zlib.error, ImageFileError, HeaderDataError, ValueError)
    try:
        img = nib.load(str(path))
    except unreadable as exc:
        raise DataError(f"{role} {path}: cannot read the file (corrupt or not NIfTI?): {exc}") from exc
    shape = tuple(img.shape)
    if 0 in shape:
        raise DataError(f"{role} {path}: empty volume, shape {shape} has a zero-size axis")
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise DataError(f"{role} {path}: expected a 3-D volume (X, Y, Z), got shape {shape}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape[:3])
    except unreadable as exc:
        raise DataError(f"{role} {path}: cannot read the image data (truncated or corrupt file?): {exc}") from exc
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise DataError(f"{role} {path}: expected real numbers, got data type {data.dtype}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DataError(f"{role} {path}: contains NaN or infinite values")
    if role == "image" and data.min() == data.max():
        raise DataError(f"{role} {path}: empty volume, every voxel has the value {data.flat[0]}")
    header = img.header.copy()
    header.set_data_shape(data.shape)
    return nib.Nifti1Image(data, img.affine, header)


def check_pair(image: nib.Nifti1Image, label: nib.Nifti1Image, image_path: Path, label_path: Path) -> None:
    """Raise :class:`DataError` unless image and label have the same shape and (nearly) the same affine."""
    if image.shape != label.shape:
        raise DataError(
            f"label {label_path}: shape {tuple(label.shape)} does not match its image {image_path} "
            f"of shape {tuple(image.shape)}"
        )
    if not np.allclose(image.affine, label.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        raise DataError(
            f"label {label_path}: affine does not match its image {image_path}\n"
            f"image affine:\n{np.array2string(image.affine, precision=4)}\n"
            f"label affine:\n{np.array2string(label.affine, precision=4)}"
        )


def label_indices(label: np.ndarray, label_map: dict[int, int], path: Path) -> np.ndarray:
    """Map raw label values to training indices (uint8), checking every value is in ``label_map``.

    ``label`` holds the raw values of a label file (any numeric dtype, integer-valued);
    ``label_map`` maps raw value -> training index. Raises :class:`DataError` naming the file for
    non-integer values and for values the class map does not know.
    """
    data = np.asarray(label)
    if np.issubdtype(data.dtype, np.floating):
        rounded = np.round(data)
        fractional = data != rounded
        if fractional.any():
            raise DataError(f"label {path}: expected integer label values, found {np.unique(data[fractional])[:5]}")
        data = rounded.astype(np.int64)
    lo, hi = int(data.min()), int(data.max())
    if lo >= 0 and hi < 2**16:
        # small non-negative values (every dataset here): a lookup table, much faster than np.unique
        data = data.astype(np.intp, copy=False)
        values = np.flatnonzero(np.bincount(data.ravel(), minlength=hi + 1))
        inverse = None
    else:
        values, inverse = np.unique(data, return_inverse=True)
    raw = [int(v) for v in values]
    unknown = [v for v in raw if v not in label_map]
    if unknown:
        raise DataError(
            f"label {path}: values {unknown} are not in the class map (known raw values: "
            f"{sorted(label_map)}); pass --classes to map them"
        )
    if inverse is None:
        lut = np.zeros(hi + 1, dtype=np.uint8)
        lut[values] = [label_map[v] for v in raw]
        return lut[data]
    lut = np.array([label_map[v] for v in raw], dtype=np.uint8)
    return lut[inverse.reshape(data.shape)]
