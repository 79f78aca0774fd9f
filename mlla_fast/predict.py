"""``mlla-fast predict``: label maps for new NIfTI images with a trained run.

Each image is preprocessed as the run's training data was (:func:`mlla_fast.data.load_and_preprocess`,
from the manifest the run saved), predicted slice by slice, put back on the image's own voxel grid
(:func:`mlla_fast.data.restore_to_source`) and written as uint8 NIfTI with the input's affine and
header, under the input's file name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .backend import BACKENDS
from .data import DataError, load_and_preprocess, restore_to_source
from .data.nifti import NIFTI_SUFFIXES, is_nifti
from .distributed import resolve_device
from .inference import predict_volume
from .runs import CHECKPOINTS, RunError, check_writable, load_trained_model


def list_inputs(source: str | Path) -> list[Path]:
    """The NIfTI file ``source``, or the NIfTI files directly inside the folder ``source`` (sorted)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and is_nifti(p))
        if not files:
            raise DataError(f"no NIfTI files ({', '.join(NIFTI_SUFFIXES)}) in {source}")
        return files
    if not source.is_file():
        raise DataError(f"input {source} does not exist; expected a NIfTI file or a folder of them")
    if not is_nifti(source):
        raise DataError(f"input {source} is not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})")
    return [source]


def save_label_like(label: np.ndarray, reference: nib.spatialimages.SpatialImage, path: Path) -> None:
    """Write a uint8 label map with the affine and header of ``reference`` (intensity scaling removed)."""
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = type(reference)(np.asarray(label, dtype=np.uint8), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(path))


def predict_files(run_dir: str | Path, source: str | Path, output: str | Path, checkpoint: str = "best",
                  device: str | None = None, batch_size: int = 32, backend: str | None = None,
                  progress: bool | None = None) -> list[Path]:
    """Predict every input image (a NIfTI file or a folder of them); returns the files written.

    One output per input, named like the input, in the folder ``output``. Refuses to overwrite an input.
    """
    inputs = list_inputs(source)
    out_dir = Path(output)
    torch_device = resolve_device(device)
    model, config, manifest, _ = load_trained_model(run_dir, checkpoint, torch_device, backend)
    check_writable(out_dir)
    written = []
    for path in tqdm(inputs, desc="predict", unit="image", disable=None if progress is None else not progress):
        target = out_dir / path.name
        if target.resolve() == path.resolve():
            raise RunError(f"the output {target} would overwrite the input; choose another --output folder")
        array, meta = load_and_preprocess(path, manifest)
        label = predict_volume(model, array, config.image_size, torch_device, batch_size)
        save_label_like(restore_to_source(label, meta), nib.load(str(path)), target)
        written.append(target)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mlla-fast predict``."""
    parser.add_argument("--run", type=Path, required=True, help="training run folder")
    parser.add_argument("--input", type=Path, required=True, help="a NIfTI image, or a folder of them")
    parser.add_argument("--output", type=Path, required=True, help="folder for the label maps (created)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help="default: best")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--backend", choices=BACKENDS, help="MLLA block kernels (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")


def run(args: argparse.Namespace) -> int:
    """Predict from the command line; exit status 2 for a usage or data problem."""
    try:
        written = predict_files(args.run, args.input, args.output, args.checkpoint, args.device, args.batch_size,
                                args.backend)
    except (DataError, RunError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} label map(s) to {args.output}")
    return 0
