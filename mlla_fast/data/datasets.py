"""PyTorch datasets over a prepared folder: 2-D axial slices for training, whole volumes for evaluation.

Arrays are memory-mapped (``np.load(mmap_mode="r")``) and opened lazily in each process, so a
``DataLoader`` with worker processes shares the page cache instead of copying volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from .manifest import load_manifest
from .nifti import DataError

ROTATION_RANGE = (-20, 20)


def augment_slice(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The released training augmentation (SPEC section 5) of one (H, W) slice and its label.

    With probability 0.5: rotate by a random multiple of 90 degrees, then flip along a random
    axis; otherwise with probability 0.5: rotate by an integer angle in [-20, 20) degrees
    (nearest neighbour for image and label, as released, filling with 0, shape kept);
    otherwise nothing. Draws from ``rng`` only.
    """
    if rng.random() > 0.5:
        k = int(rng.integers(0, 4))
        axis = int(rng.integers(0, 2))
        image = np.flip(np.rot90(image, k), axis=axis)
        label = np.flip(np.rot90(label, k), axis=axis)
    elif rng.random() > 0.5:
        angle = int(rng.integers(*ROTATION_RANGE))
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    return image, label


def resize_slice(array: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    """Resize an (H, W) slice to ``size`` with scipy.ndimage.zoom (order 3 image, 0 label), as released."""
    size = tuple(int(s) for s in size)
    if array.shape == size:
        return np.ascontiguousarray(array)
    factors = (size[0] / array.shape[0], size[1] / array.shape[1])
    out = ndimage.zoom(array, factors, order=order)
    if out.shape != size:
        raise RuntimeError(f"zoom produced {out.shape}, expected {size}")
    return out


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {size!r}")
    return (int(size[0]), int(size[1]))


class _PreparedCases:
    """Shared access to the cases of one split of a prepared folder (lazy memory maps)."""

    def __init__(self, prepared_dir: str | Path, split: str) -> None:
        self.root = Path(prepared_dir)
        self.manifest = load_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.manifest['splits'])}")
        self.split = split
        self.ids: list[str] = list(self.manifest["splits"][split])
        self.class_names: list[str] = list(self.manifest["class_names"])
        self.num_classes: int = int(self.manifest["num_classes"])
        self._maps: dict[tuple[str, str], np.ndarray] = {}

    def array(self, case_id: str, key: str) -> np.ndarray:
        cached = self._maps.get((case_id, key))
        if cached is None:
            path = self.root / self.manifest["cases"][case_id][key]
            try:
                cached = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read prepared array {path}: {exc}; rerun `mlla-fast prepare`") from exc
            self._maps[(case_id, key)] = cached
        return cached

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps would pickle as full arrays; worker processes reopen them instead.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class _CasesDataset(Dataset):
    """A torch Dataset over the cases of one split of a prepared folder (``self._cases``)."""

    _cases: _PreparedCases

    @property
    def num_classes(self) -> int:
        return self._cases.num_classes

    @property
    def class_names(self) -> list[str]:
        return self._cases.class_names

    @property
    def manifest(self) -> dict:
        return self._cases.manifest


class SliceDataset(_CasesDataset):
    """All axial slices ``[:, :, z]`` of a split's cases, resized (and augmented) for 2-D training.

    Item i is ``(image, label)``: image float32 tensor (1, S, S) (cubic resize), label int64
    tensor (S, S) (nearest resize), S = ``image_size`` (an int, or (H, W)). With ``augment`` the
    SPEC section 5 augmentation (:func:`augment_slice`) is applied before resizing, drawn from an
    RNG seeded by (``seed``, the epoch set by :meth:`set_epoch`, i), so an item is the same
    whenever it is asked for again, in any process, and a resumed run sees the same data. With a
    ``DataLoader``, call ``set_epoch`` before iterating (worker processes copy the dataset at
    that point; with ``persistent_workers=True`` they would keep the old epoch).
    """

    def __init__(
        self,
        prepared_dir: str | Path,
        split: str = "train",
        image_size: int | Sequence[int] = 224,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        self._cases = _PreparedCases(prepared_dir, split)
        self.image_size = _pair(image_size)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        if not self._cases.ids:
            raise DataError(f"split {split!r} of {prepared_dir} has no cases")
        index = []
        for number, case_id in enumerate(self._cases.ids):
            entry = self._cases.manifest["cases"][case_id]
            if entry["label"] is None:
                raise DataError(f"case {case_id!r} of split {split!r} has no label; SliceDataset needs labels")
            index.extend((number, z) for z in range(int(entry["shape"][2])))
        self._index = np.array(index, dtype=np.int64).reshape(-1, 2)

    @property
    def case_ids(self) -> list[str]:
        return self._cases.ids

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (deterministic per (seed, epoch, index))."""
        self.epoch = int(epoch)

    def slice_location(self, index: int) -> tuple[str, int]:
        """(case id, z) of item ``index``."""
        number, z = self._index[index]
        return self._cases.ids[int(number)], int(z)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"slice index {index} out of range for {len(self)} slices")
        index = index % len(self)
        case_id, z = self.slice_location(index)
        image = np.array(self._cases.array(case_id, "image")[:, :, z], dtype=np.float32)
        label = np.array(self._cases.array(case_id, "label")[:, :, z], dtype=np.uint8)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, label = augment_slice(image, label, rng)
        image = resize_slice(image, self.image_size, order=3)
        label = resize_slice(label, self.image_size, order=0)
        return torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)), torch.from_numpy(
            label.astype(np.int64)
        )


class VolumeDataset(_CasesDataset):
    """Whole prepared volumes of a split, for evaluation.

    Item i is a dict: ``id`` (str), ``image`` float32 (X, Y, Z), ``label`` uint8 (X, Y, Z) or
    None, ``spacing`` (sx, sy, sz) in mm and ``affine`` (4x4 float64 numpy) of the prepared
    arrays (RAS+). ``meta(i)`` is the full manifest entry, for
    :func:`~mlla_fast.data.preprocess.restore_to_source`.
    """

    def __init__(self, prepared_dir: str | Path, split: str = "test") -> None:
        self._cases = _PreparedCases(prepared_dir, split)

    @property
    def ids(self) -> list[str]:
        return self._cases.ids

    def meta(self, index: int) -> dict:
        """The manifest entry of case ``index``."""
        return self._cases.manifest["cases"][self._cases.ids[index]]

    def __len__(self) -> int:
        return len(self._cases.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_id = self._cases.ids[index]
        entry = self._cases.manifest["cases"][case_id]
        label = None
        if entry["label"] is not None:
            label = np.array(self._cases.array(case_id, "label"), dtype=np.uint8)
        return {
            "id": case_id,
            "image": np.array(self._cases.array(case_id, "image"), dtype=np.float32),
            "label": label,
            "spacing": tuple(float(s) for s in entry["spacing"]),
            "affine": np.array(entry["affine"], dtype=np.float64),
        }
