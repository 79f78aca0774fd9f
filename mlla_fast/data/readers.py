"""Readers for each dataset's own distributed folder layout.

Every reader takes the dataset's root folder and returns a list of :class:`Case` (id, image
path, label path, split), sorted by id, after checking that every image it uses has its label.
Readers look at file names only; the volumes themselves are checked when they are prepared.

Layouts accepted (``ROOT`` is the folder given to ``--data-root``):

- BTCV / Synapse: ``ROOT/RawData/Training/img/img0001.nii.gz`` with
  ``ROOT/RawData/Training/label/label0001.nii.gz`` (``ROOT`` may also be ``RawData`` or
  ``Training`` itself). Case ids ``case0001`` as in TransUNet. Split: the usual 18 training
  cases / 12 test cases of TransUNet; no validation cases (use ``--split`` to hold some out).
- AMOS22: ``ROOT/imagesTr/amos_0001.nii.gz`` + ``ROOT/labelsTr/amos_0001.nii.gz`` and
  ``imagesVa/`` + ``labelsVa/``; ids < 500 are CT, >= 500 MRI. ``imagesTr`` gives train (with
  a fixed 10% held out as val), ``imagesVa`` gives test (its labels are public; ``imagesTs``
  has none and is ignored).
- FLARE22: ``FLARE22_Tr_0001_0000.nii.gz`` (image) + ``FLARE22_Tr_0001.nii.gz`` (label)
  anywhere below ``ROOT``: in ``images/`` and ``labels/`` folders (as distributed),
  ``imagesTr/`` and ``labelsTr/``, or side by side in one folder. Fixed 70/10/20 split.
- ACDC: ``ROOT/**/patientXXX/patientXXX_frameYY.nii.gz`` + ``patientXXX_frameYY_gt.nii.gz``
  with ``Info.cfg``; the ED and ES frames named there are the cases (``patientXXX_frameYY``).
  ``patientXXX_4d.nii.gz`` cine files are ignored. Only patients 1-100 (the training set) are
  used; split by patient within each block of 20 (one pathology group per block): positions
  1-14 train, 15-16 val, 17-20 test, i.e. 70/10/20 patients stratified by group.
- WORD: ``ROOT/imagesTr`` + ``labelsTr`` (train), ``imagesVal`` + ``labelsVal`` (val),
  ``imagesTs`` + ``labelsTs`` (test), the same file name in the image and label folder.
- ATLAS 2023: an images folder (``imagesTr`` or ``images``) and a labels folder
  (``labelsTr`` or ``labels``) anywhere below ``ROOT``; ``im12.nii.gz`` pairs with
  ``lb12.nii.gz`` (prefixes ``im``/``img``/``image`` and ``lb``/``lbl``/``label``/``seg``/
  ``mask`` are ignored when pairing, as is a ``_0000`` channel suffix); identical names also
  pair. Fixed 70/10/20 split.
- generic (Medical Segmentation Decathlon / nnU-Net): ``ROOT/dataset.json``,
  ``ROOT/imagesTr`` + ``labelsTr`` [+ ``imagesTs`` + ``labelsTs``]. Images may be channel
  suffixed (``case_0000.nii.gz``, nnU-Net) or plain (``case.nii.gz``, MSD); the label is
  ``labelsTr/case.nii.gz``. The cases are dataset.json's ``training`` (and ``test``) list
  when it has one, else every image in ``imagesTr`` (and ``imagesTs``). Labelled ``imagesTs``
  cases are the test split and 10% of the training cases are held out as val; without test
  labels, 10% val and 20% test are held out.

"Fixed" and "held out" splits are a permutation of the sorted case ids by
``numpy.random.default_rng(0)``, so they never change between runs or machines.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .nifti import DataError, find_nifti, is_nifti, nifti_stem

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

SYNAPSE_TRAIN = (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)
SYNAPSE_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)


@dataclass(frozen=True)
class Case:
    """One volume of a dataset: its id, image file, label file (None if unlabelled) and split."""

    id: str
    image: Path
    label: Path | None
    split: str


def holdout_split(
    ids: Iterable[str], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, str]:
    """Assign each id to train/val/test by a seeded permutation of the sorted ids.

    With n ids, ``round(n * fraction)`` go to val and to test, at least one each when the
    fraction is positive and n >= 3, and at least one id always stays in train. Returns
    ``{id: split}``; the same ids always give the same answer.
    """
    ordered = sorted(ids)
    n = len(ordered)

    def count(fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 0 and n >= 3 else 0

    n_val, n_test = count(val_fraction), count(test_fraction)
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    order = np.random.default_rng(seed).permutation(n)
    split = {}
    for rank, position in enumerate(order):
        split[ordered[position]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return split


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} folder not found: {path}")
    return path


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _check_unique(cases: list[Case], root: Path) -> list[Case]:
    seen: dict[str, Case] = {}
    for case in cases:
        if case.id in seen:
            raise DataError(f"{root}: case id {case.id!r} appears twice: {seen[case.id].image} and {case.image}")
        seen[case.id] = case
    if not cases:
        raise DataError(f"{root}: no cases found")
    return sorted(cases, key=lambda c: c.id)


def _paired_folder(images: Path, labels: Path, split: str, pattern: str | None = None) -> list[Case]:
    """Images in ``images`` with the same-named label in ``labels``; every image must have one."""
    cases = []
    for image in _niftis(images):
        stem = nifti_stem(image)
        if pattern is not None and not re.fullmatch(pattern, stem):
            continue
        label = find_nifti(labels, stem)
        if label is None:
            raise DataError(f"image {image} has no label: expected {labels / (stem + '.nii.gz')}")
        cases.append(Case(stem, image, label, split))
    return cases


def read_btcv(root: str | Path) -> list[Case]:
    """BTCV / Synapse ``RawData/Training/{img,label}`` (see the module docstring)."""
    root = _require_dir(Path(root), "BTCV data root")
    for base in (root / "RawData" / "Training", root / "Training", root):
        if (base / "img").is_dir():
            break
    else:
        raise DataError(f"{root}: expected the BTCV layout RawData/Training/img/img0001.nii.gz, found no img/ folder")
    labels = _require_dir(base / "label", "BTCV label")
    cases = []
    for image in _niftis(base / "img"):
        match = re.fullmatch(r"img(\d+)", nifti_stem(image))
        if match is None:
            continue
        number = int(match.group(1))
        label = find_nifti(labels, f"label{match.group(1)}")
        if label is None:
            raise DataError(f"image {image} has no label: expected {labels / f'label{match.group(1)}.nii.gz'}")
        if number in SYNAPSE_TRAIN:
            split = "train"
        elif number in SYNAPSE_TEST:
            split = "test"
        else:
            logger.warning("BTCV: %s is in neither the Synapse train nor test list; ignored", image)
            continue
        cases.append(Case(f"case{number:04d}", image, label, split))
    return _check_unique(cases, root)


def read_amos(root: str | Path, mr: bool = False) -> list[Case]:
    """AMOS22 ``imagesTr``/``labelsTr`` + ``imagesVa``/``labelsVa``: CT ids < 500, or MRI ids >= 500 if ``mr``."""
    root = _require_dir(Path(root), "AMOS data root")
    images_tr = _require_dir(root / "imagesTr", "AMOS imagesTr")
    labels_tr = _require_dir(root / "labelsTr", "AMOS labelsTr")

    def wanted(case: Case) -> bool:
        return (int(case.id.split("_")[1]) >= 500) == mr

    train = [c for c in _paired_folder(images_tr, labels_tr, "train", r"amos_\d{4}") if wanted(c)]
    held_out = holdout_split([c.id for c in train], val_fraction=0.1, test_fraction=0.0)
    cases = [Case(c.id, c.image, c.label, held_out[c.id]) for c in train]
    if (root / "imagesVa").is_dir():
        if (root / "labelsVa").is_dir():
            cases += [
                c for c in _paired_folder(root / "imagesVa", root / "labelsVa", "test", r"amos_\d{4}") if wanted(c)
            ]
        else:
            logger.warning("AMOS: %s has no labelsVa/ folder; the validation images are not used", root)
    return _check_unique(cases, root)


def read_flare22(root: str | Path) -> list[Case]:
    """FLARE22 labelled cases ``FLARE22_Tr_XXXX_0000.nii.gz`` + ``FLARE22_Tr_XXXX.nii.gz`` below ``root``."""
    root = _require_dir(Path(root), "FLARE22 data root")
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in sorted(root.rglob("FLARE22_Tr_*")):
        if not (path.is_file() and is_nifti(path)):
            continue
        match = re.fullmatch(r"(FLARE22_Tr_\d{4})(_0000)?", nifti_stem(path))
        if match is None:
            continue
        key = match.group(1)
        target = images if match.group(2) else labels
        if key in target:
            raise DataError(f"FLARE22: {key} found twice: {target[key]} and {path}")
        target[key] = path
    if not images:
        raise DataError(f"{root}: no FLARE22 images (FLARE22_Tr_0001_0000.nii.gz) found")
    missing = [images[k] for k in images if k not in labels]
    if missing:
        raise DataError(
            f"image {missing[0]} has no label: expected {missing[0].name.replace('_0000', '')} "
            f"in {missing[0].parent} or a labels/ folder beside it ({len(missing)} images lack one)"
        )
    orphans = sorted(set(labels) - set(images))
    if orphans:
        logger.warning("FLARE22: labels without an image are ignored: %s", ", ".join(orphans))
    split = holdout_split(images, 0.1, 0.2)
    return _check_unique([Case(k, images[k], labels[k], split[k]) for k in images], root)


def acdc_split(patient: int) -> str:
    """ACDC patient number (1-100) -> split: positions 1-14 / 15-16 / 17-20 of each block of 20."""
    position = (patient - 1) % 20
    return "train" if position < 14 else "val" if position < 16 else "test"


def _read_info_cfg(path: Path) -> dict[str, str]:
    info = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def read_acdc(root: str | Path) -> list[Case]:
    """ACDC ``patientXXX/`` folders: the ED and ES frames of ``Info.cfg`` with their ``_gt`` labels."""
    root = _require_dir(Path(root), "ACDC data root")
    cases = []
    ignored = []
    folders = sorted(p for p in root.rglob("patient*") if p.is_dir() and re.fullmatch(r"patient\d{3}", p.name))
    if not folders:
        raise DataError(f"{root}: no ACDC patient folders (patient001/) found")
    for folder in folders:
        patient = int(folder.name[7:])
        if patient > 100:
            ignored.append(folder.name)
            continue
        info_path = folder / "Info.cfg"
        if not info_path.is_file():
            raise DataError(f"ACDC: {info_path} not found (it names the ED and ES frames)")
        info = _read_info_cfg(info_path)
        frames = []
        for key in ("ED", "ES"):
            try:
                frames.append(int(info[key]))
            except (KeyError, ValueError) as exc:
                raise DataError(f"ACDC: {info_path} has no integer '{key}:' line") from exc
        for frame in dict.fromkeys(frames):
            stem = f"{folder.name}_frame{frame:02d}"
            image = find_nifti(folder, stem)
            if image is None:
                raise DataError(f"ACDC: frame file {folder / (stem + '.nii.gz')} named in {info_path} not found")
            label = find_nifti(folder, f"{stem}_gt")
            if label is None:
                raise DataError(f"image {image} has no label: expected {folder / (stem + '_gt.nii.gz')}")
            cases.append(Case(stem, image, label, acdc_split(patient)))
    if ignored:
        logger.warning(
            "ACDC: patients above 100 (the challenge test set) are not in the usual split and are "
            "ignored: %s (pass --split to use them)",
            ", ".join(ignored),
        )
    return _check_unique(cases, root)


def read_word(root: str | Path) -> list[Case]:
    """WORD ``imagesTr/labelsTr``, ``imagesVal/labelsVal``, ``imagesTs/labelsTs``."""
    root = _require_dir(Path(root), "WORD data root")
    cases = []
    for split, suffix in (("train", "Tr"), ("val", "Val"), ("test", "Ts")):
        images, labels = root / f"images{suffix}", root / f"labels{suffix}"
        if split == "train" or images.is_dir():
            cases += _paired_folder(
                _require_dir(images, f"WORD images{suffix}"), _require_dir(labels, f"WORD labels{suffix}"), split
            )
    return _check_unique(cases, root)


_ATLAS_PREFIX = re.compile(r"^(image|img|im|label|lbl|lb|seg|mask)[_-]?", re.IGNORECASE)


def _atlas_key(stem: str) -> str:
    return _ATLAS_PREFIX.sub("", re.sub(r"_0000$", "", stem))


def _find_folder(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    for name in names:
        found = sorted(p for p in root.rglob(name) if p.is_dir())
        if found:
            return found[0]
    return None


def read_atlas2023(root: str | Path) -> list[Case]:
    """ATLAS 2023 images + labels folders (``imagesTr/im0.nii.gz`` + ``labelsTr/lb0.nii.gz``, tolerant)."""
    root = _require_dir(Path(root), "ATLAS 2023 data root")
    images = _find_folder(root, ("imagesTr", "images"))
    labels = _find_folder(root, ("labelsTr", "labels"))
    if images is None or labels is None:
        raise DataError(f"{root}: expected ATLAS 2023 folders imagesTr/ (or images/) and labelsTr/ (or labels/)")
    by_key: dict[str, Path] = {}
    for label in _niftis(labels):
        for key in {nifti_stem(label), _atlas_key(nifti_stem(label))}:
            by_key.setdefault(key, label)
    cases = []
    for image in _niftis(images):
        stem = nifti_stem(image)
        label = by_key.get(stem) or by_key.get(_atlas_key(stem))
        if label is None:
            raise DataError(f"image {image} has no label in {labels} (looked for {stem} and *{_atlas_key(stem)})")
        cases.append(Case(stem, image, label, "train"))
    split = holdout_split([c.id for c in cases], 0.1, 0.2)
    return _check_unique([Case(c.id, c.image, c.label, split[c.id]) for c in cases], root)


def read_dataset_json(root: str | Path) -> dict | None:
    """``root/dataset.json`` parsed, or None if there is none; DataError if it is not valid JSON."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _generic_image(images: Path, labels: Path, image: Path) -> tuple[str, Path] | None:
    """(case id, label) of an image in an MSD/nnU-Net folder pair; None for a channel other than 0."""
    stem = nifti_stem(image)
    label = find_nifti(labels, stem)
    if label is not None:
        return stem, label
    match = re.fullmatch(r"(.+)_(\d{4})", stem)
    if match:
        label = find_nifti(labels, match.group(1))
        if label is not None:
            if match.group(2) != "0000":
                return None
            return match.group(1), label
    raise DataError(
        f"image {image} has no label: expected {labels / (stem + '.nii.gz')}"
        + (f" or {labels / (match.group(1) + '.nii.gz')}" if match else "")
    )


def _generic_listed(root: Path, entries: list) -> list[tuple[str, Path, Path]]:
    """The ``training`` list of an MSD dataset.json as (id, image, label)."""
    found = []
    for entry in entries:
        if not (isinstance(entry, dict) and "image" in entry and "label" in entry):
            raise DataError(
                f"{root / 'dataset.json'}: 'training' entries must be {{'image': ..., 'label': ...}}, got {entry!r}"
            )
        image = root / entry["image"]
        if not image.is_file():
            suffixed = image.with_name(nifti_stem(image) + "_0000.nii.gz")
            if not suffixed.is_file():
                raise DataError(f"image {image} listed in {root / 'dataset.json'} not found (nor {suffixed.name})")
            image = suffixed
        label = root / entry["label"]
        if not label.is_file():
            raise DataError(f"image {image} has no label: {label} listed in {root / 'dataset.json'} not found")
        found.append((nifti_stem(label), image, label))
    return found


def read_generic(root: str | Path) -> list[Case]:
    """Any dataset in the MSD / nnU-Net layout: dataset.json, imagesTr/ + labelsTr/ [+ imagesTs/ + labelsTs/]."""
    root = _require_dir(Path(root), "data root")
    meta = read_dataset_json(root)
    if meta is None:
        raise DataError(
            f"{root}: dataset.json not found (expected the MSD / nnU-Net layout: dataset.json, imagesTr/, labelsTr/)"
        )
    images_tr = _require_dir(root / "imagesTr", "imagesTr")
    labels_tr = _require_dir(root / "labelsTr", "labelsTr")
    if meta.get("training"):
        training = _generic_listed(root, meta["training"])
    else:
        training = []
        for image in _niftis(images_tr):
            pair = _generic_image(images_tr, labels_tr, image)
            if pair is not None:
                training.append((pair[0], image, pair[1]))
    multichannel = [p for p in images_tr.iterdir() if re.fullmatch(r".+_0001\.nii(\.gz)?", p.name)]
    if multichannel:
        logger.warning(
            "%s: images have several channels (e.g. %s); only channel 0 (_0000) is used",
            images_tr,
            multichannel[0].name,
        )
    test = []
    listed_test = None
    if isinstance(meta.get("test"), list) and meta["test"]:
        listed_test = {re.sub(r"_0000$", "", nifti_stem(str(entry))) for entry in meta["test"]}
    if (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir():
        for image in _niftis(root / "imagesTs"):
            pair = _generic_image(root / "imagesTs", root / "labelsTs", image)
            if pair is not None and (listed_test is None or pair[0] in listed_test):
                test.append(Case(pair[0], image, pair[1], "test"))
    elif (root / "imagesTs").is_dir():
        logger.info("%s: imagesTs/ has no labelsTs/; test cases are held out from the training list", root)
    split = holdout_split([t[0] for t in training], 0.1, 0.0 if test else 0.2)
    return _check_unique([Case(i, img, lab, split[i]) for i, img, lab in training] + test, root)
