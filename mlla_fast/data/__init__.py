"""Datasets, preprocessing, the prepared cache and the built-in synthetic phantom.

Raw data in a dataset's own layout -> ``mlla-fast prepare`` (:func:`prepare_dataset`) -> a
prepared folder (``manifest.json`` + ``cases/*.npy``, see :mod:`mlla_fast.data.manifest`) ->
:class:`SliceDataset` for training and :class:`VolumeDataset` for evaluation.
:func:`load_and_preprocess` and :func:`restore_to_source` take new images to the prepared grid
and predictions back to the image's own voxel grid.
"""

from .datasets import SliceDataset, VolumeDataset, augment_slice, resize_slice
from .manifest import MANIFEST_FORMAT, load_manifest
from .nifti import DataError
from .phantom import PHANTOM_CLASSES, make_phantom
from .prepare import prepare_dataset
from .preprocess import load_and_preprocess, restore_to_source
from .readers import Case
from .registry import DATASET_ALIASES, DATASETS, DatasetSpec, get_dataset_spec, resolve_spec

__all__ = [
    "DATASETS",
    "DATASET_ALIASES",
    "MANIFEST_FORMAT",
    "PHANTOM_CLASSES",
    "Case",
    "DataError",
    "DatasetSpec",
    "SliceDataset",
    "VolumeDataset",
    "augment_slice",
    "get_dataset_spec",
    "load_and_preprocess",
    "load_manifest",
    "make_phantom",
    "prepare_dataset",
    "resize_slice",
    "resolve_spec",
    "restore_to_source",
]
