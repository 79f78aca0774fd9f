"""The prepared folder's ``manifest.json``: reading with validation, and atomic writing.

Layout of a prepared folder (format 1)::

    PREPARED/manifest.json
    PREPARED/cases/<id>_image.npy   float32 (X, Y, Z), preprocessed intensities, RAS+
    PREPARED/cases/<id>_label.npy   uint8 (X, Y, Z), training indices 0..K-1
    PREPARED/cases/<id>.json        the case's manifest entry (marks the case as finished)

The manifest holds ``format``, ``dataset``, ``modality``, ``class_names``, ``num_classes``,
``loss_weights``, ``orientation``, ``intensity``, ``in_plane_spacing``, ``label_values``,
``splits`` ({"train", "val", "test"} -> ids) and ``cases`` (id -> entry with ``image``,
``label``, ``shape``, ``spacing``, ``affine``, ``source_image``, ``source_shape``,
``source_affine``, ``in_plane_resampled``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .nifti import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED_KEYS = (
    "format",
    "dataset",
    "modality",
    "class_names",
    "num_classes",
    "loss_weights",
    "orientation",
    "intensity",
    "splits",
    "cases",
)
CASE_KEYS = ("image", "label", "shape", "spacing", "affine", "source_image", "source_shape", "source_affine")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _prepare_hint(folder: Path) -> str:
    return f"run `mlla-fast prepare --dataset NAME --data-root RAW --out {folder}` first"


def load_manifest(prepared_dir: str | Path, check_files: bool = True) -> dict:
    """Read and validate ``prepared_dir/manifest.json``.

    Checks the format version, the required keys, that ``num_classes`` matches ``class_names``,
    that every split id has a case entry, and (``check_files``) that every case's arrays exist.
    Raises :class:`DataError` saying what is missing and to run ``mlla-fast prepare``. The
    returned dict gets ``"root"``: the prepared folder as a string.
    """
    folder = Path(prepared_dir)
    if not folder.is_dir():
        raise DataError(f"prepared folder {folder} does not exist; {_prepare_hint(folder)}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path} not found: {folder} is not a prepared dataset or its preparation did not finish; "
            f"{_prepare_hint(folder)}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); {_prepare_hint(folder)}") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object; {_prepare_hint(folder)}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"{path}: missing keys {missing}; {_prepare_hint(folder)}")
    if manifest["format"] != MANIFEST_FORMAT:
        raise DataError(
            f"{path}: format {manifest['format']!r}, this version reads format {MANIFEST_FORMAT}; "
            f"{_prepare_hint(folder)}"
        )
    if manifest["num_classes"] != len(manifest["class_names"]):
        raise DataError(f"{path}: num_classes {manifest['num_classes']} but {len(manifest['class_names'])} class names")
    cases = manifest["cases"]
    for split in ("train", "val", "test"):
        ids = manifest["splits"].get(split)
        if not isinstance(ids, list):
            raise DataError(f"{path}: splits must have a '{split}' list")
        unknown = [i for i in ids if i not in cases]
        if unknown:
            raise DataError(f"{path}: split '{split}' lists cases without an entry: {unknown[:5]}")
    for case_id, entry in cases.items():
        absent = [k for k in CASE_KEYS if k not in entry]
        if absent:
            raise DataError(f"{path}: case {case_id!r} lacks {absent}")
        if check_files:
            for key in ("image", "label"):
                if entry[key] is not None and not (folder / entry[key]).is_file():
                    raise DataError(
                        f"{path}: {key} array {folder / entry[key]} of case {case_id!r} is missing; "
                        f"{_prepare_hint(folder)}"
                    )
    manifest["root"] = str(folder)
    return manifest
