"""``mlla-fast prepare``: reorient, resample, normalise and cache a dataset for fast training.

Each case is read from the dataset's own layout (:mod:`mlla_fast.data.readers`), checked, put on
the prepared grid (:mod:`mlla_fast.data.preprocess`) and written as ``cases/<id>_image.npy`` and
``cases/<id>_label.npy``, then ``cases/<id>.json`` (its manifest entry, which marks it finished).
Every file is written under a temporary name and renamed, so an interrupted run leaves no
half-written case; a rerun skips the finished cases whose settings and source files are
unchanged and does the rest. ``manifest.json`` is removed when a run starts and rewritten
atomically at the end, listing only finished cases, so a folder whose preparation did not finish
is never mistaken for a prepared one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, write_json_atomic
from .nifti import DataError, check_pair, label_indices, load_volume
from .preprocess import ORIENTATION, geometry_meta, preprocess_image, to_prepared_grid
from .readers import SPLITS, Case
from .registry import DATASET_ALIASES, DATASETS, parse_split, resolve_spec

logger = logging.getLogger(__name__)

CASES_DIR = "cases"


def _file_stamp(path: Path | None) -> list | None:
    if path is None:
        return None
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def _fingerprint(case: Case, settings: Mapping[str, Any]) -> dict:
    """What a finished case depends on: the preparation settings and its source files."""
    return {"settings": dict(settings), "image": _file_stamp(case.image), "label": _file_stamp(case.label)}


def _save_npy(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def prepare_case(case: Case, settings: Mapping[str, Any], out: Path) -> dict:
    """Prepare one case into ``out/cases`` and return its manifest entry.

    ``settings`` holds ``intensity``, ``in_plane_spacing`` and ``label_map`` (raw value as a
    string -> training index). Raises :class:`DataError` (naming the file) for a bad case.
    """
    image = load_volume(case.image, "image")
    array, geometry = preprocess_image(image, settings["intensity"], settings["in_plane_spacing"])
    entry: dict[str, Any] = {"image": f"{CASES_DIR}/{case.id}_image.npy", "label": None}
    label_array = None
    if case.label is not None:
        label = load_volume(case.label, "label")
        check_pair(image, label, case.image, case.label)
        label_map = {int(raw): index for raw, index in settings["label_map"].items()}
        indices = label_indices(np.asanyarray(label.dataobj), label_map, case.label)
        label_array = to_prepared_grid(indices, geometry, order=0)
        entry["label"] = f"{CASES_DIR}/{case.id}_label.npy"
    entry.update(geometry_meta(geometry))
    entry["source_image"] = str(case.image)
    entry["source_label"] = None if case.label is None else str(case.label)
    _save_npy(array, out / entry["image"])
    if label_array is not None:
        _save_npy(label_array, out / entry["label"])
    write_json_atomic(
        out / CASES_DIR / f"{case.id}.json", {"fingerprint": _fingerprint(case, settings), "entry": entry}
    )
    return entry


def _finished_entry(case: Case, settings: Mapping[str, Any], out: Path) -> dict | None:
    """The stored entry of a case finished by an earlier run with the same settings and sources, else None."""
    record_path = out / CASES_DIR / f"{case.id}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    entry = record.get("entry") if isinstance(record, dict) else None
    if not entry or record.get("fingerprint") != json.loads(json.dumps(_fingerprint(case, settings))):
        return None
    if not all((out / entry[key]).is_file() for key in ("image", "label") if entry.get(key)):
        return None
    return entry


def prepare_dataset(
    dataset: str,
    data_root: str | Path,
    out: str | Path,
    *,
    spacing: Sequence[float] | None = None,
    window: Sequence[float] | None = None,
    classes: str | Path | Mapping | None = None,
    split: str | Path | Mapping | None = None,
    skip_bad: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Prepare every case of a dataset into ``out`` and write its manifest; returns the manifest.

    ``dataset`` is a registry name (see :data:`~mlla_fast.data.registry.DATASETS`);
    ``spacing`` (sx, sy) mm resamples in-plane; ``window`` (lo, hi) overrides the CT window;
    ``classes`` and ``split`` override the class map and split (dicts or JSON files, see
    :mod:`mlla_fast.data.registry`). A bad case raises :class:`DataError`, or with
    ``skip_bad`` is left out with a warning that lists it (the manifest's ``skipped`` too).
    ``workers > 1`` prepares cases in that many processes.
    """
    data_root, out = Path(data_root), Path(out)
    spec = resolve_spec(dataset, data_root, classes, window)
    if spec.num_classes > 256:
        raise DataError(f"{spec.num_classes} classes do not fit the uint8 label cache (at most 256)")
    cases = spec.read(data_root)
    if split is not None:
        assignment = parse_split(split, [c.id for c in cases])
        cases = [replace(c, split=assignment[c.id]) for c in cases if c.id in assignment]
    settings = {
        "format": MANIFEST_FORMAT,
        "dataset": spec.name,
        "intensity": spec.intensity,
        "in_plane_spacing": None if spacing is None else [float(s) for s in spacing],
        "label_map": {str(raw): index for raw, index in sorted(spec.label_map.items())},
    }
    (out / CASES_DIR).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for leftover in (out / CASES_DIR).glob("*.tmp"):
        leftover.unlink()

    entries: dict[str, dict] = {}
    todo = []
    for case in cases:
        entry = _finished_entry(case, settings, out)
        if entry is None:
            todo.append(case)
        else:
            entries[case.id] = entry
    failures: dict[str, str] = {}

    def failed(case: Case, exc: DataError) -> None:
        if not skip_bad:
            raise DataError(f"{exc}\n(case {case.id}; pass --skip-bad to leave bad cases out)") from exc
        failures[case.id] = str(exc)

    bar = tqdm(total=len(cases), initial=len(entries), desc=f"prepare {spec.name}", unit="case", disable=not progress)
    try:
        if workers <= 1:
            for case in todo:
                try:
                    entries[case.id] = prepare_case(case, settings, out)
                except DataError as exc:
                    failed(case, exc)
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(prepare_case, case, settings, out): case for case in todo}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            case = pending.pop(future)
                            try:
                                entries[case.id] = future.result()
                            except DataError as exc:
                                failed(case, exc)
                            bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()

    if failures:
        listing = "\n".join(f"  {case_id}: {message}" for case_id, message in sorted(failures.items()))
        logger.warning("prepare %s: skipped %d bad case(s):\n%s", spec.name, len(failures), listing)
    finished = [c for c in cases if c.id in entries]
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": spec.name,
        "modality": spec.modality,
        "class_names": list(spec.class_names),
        "num_classes": spec.num_classes,
        "loss_weights": list(spec.loss_weights),
        "orientation": ORIENTATION,
        "intensity": spec.intensity,
        "in_plane_spacing": settings["in_plane_spacing"],
        "label_values": spec.label_values,
        "label_map": settings["label_map"],
        "source_root": str(data_root),
        "splits": {s: sorted(c.id for c in finished if c.split == s) for s in SPLITS},
        "skipped": failures,
        "cases": {c.id: entries[c.id] for c in sorted(finished, key=lambda c: c.id)},
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mlla-fast prepare``."""
    parser.add_argument(
        "--dataset",
        required=True,
        choices=[*DATASETS, *DATASET_ALIASES],
        help="dataset name (its folder layout is described in mlla_fast.data.readers)",
    )
    parser.add_argument("--data-root", required=True, type=Path, help="the dataset as distributed")
    parser.add_argument("--out", required=True, type=Path, help="prepared folder to write (resumes if present)")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=2,
        metavar=("SX", "SY"),
        help="resample in-plane to this spacing in mm (default: keep the source spacing)",
    )
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="CT intensity window, scaled to [0, 1] (default: the dataset's)",
    )
    parser.add_argument(
        "--classes", type=Path, metavar="JSON", help='class map override: {"raw value": [index, "name"], ...}'
    )
    parser.add_argument(
        "--split", type=Path, metavar="JSON", help='split override: {"train": [ids], "val": [ids], "test": [ids]}'
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out unreadable or inconsistent cases (listed in a warning) instead of stopping",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes preparing cases in parallel")


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset; print a summary, or the error and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        manifest = prepare_dataset(
            args.dataset,
            args.data_root,
            args.out,
            spacing=args.spacing,
            window=args.window,
            classes=args.classes,
            split=args.split,
            skip_bad=args.skip_bad,
            workers=args.workers,
        )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(manifest['splits'][s])} {s}" for s in SPLITS)
    print(f"prepared {len(manifest['cases'])} cases of {manifest['dataset']} ({counts}) in {args.out}")
    return 0
