"""One specification per supported dataset: modality, classes, label remapping, split, intensity, loss weights.

Names (``DATASETS``): ``btcv`` (alias ``synapse``), ``amos`` (CT), ``amos_mr`` (the MRI ids),
``flare22``, ``acdc``, ``word``, ``atlas2023``, ``generic`` (any dataset in the MSD / nnU-Net
layout) and ``phantom`` (the built-in synthetic dataset, in the generic layout). The folder layout
each one reads, and its split, are described in :mod:`mlla_fast.data.readers`.

Label numbering in a dataset's own files is authoritative. ``label_map`` maps raw label values
to training indices (0 = background); the class map is taken, in order of precedence, from a
user override (``--classes``: a JSON object ``{"raw value": [index, "name"], ...}``), the
``labels`` of the dataset's ``dataset.json`` (AMOS, WORD, generic, phantom; both the MSD form
``{"1": "liver"}`` and the nnU-Net v2 form ``{"liver": 1}``), or the built-in table below. A raw
value missing from the class map is an error when the data is prepared, never silently zero.

BTCV uses the 8-organ protocol of TransUNet's Synapse preprocessing: of BTCV's 13 raw labels
(1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
8 aorta, 9 inferior vena cava, 10 portal and splenic vein, 11 pancreas, 12 right adrenal gland,
13 left adrenal gland) it keeps 8 aorta -> 1, 4 gallbladder -> 2, 3 left kidney -> 3, 2 right
kidney -> 4, 6 liver -> 5, 11 pancreas -> 6, 1 spleen -> 7, 7 stomach -> 8 and sets the other five
to background, giving the class order of the TransUNet results tables (aorta, gallbladder,
kidney L, kidney R, liver, pancreas, spleen, stomach).

Intensity: CT is clipped to a window and scaled to [0, 1] (TransUNet's [-125, 275] for the
abdominal CT sets; ``--window`` overrides); MRI is z-scored over its non-zero voxels. Loss
weights (CE, Dice) are (0.4, 0.6) for BTCV / Synapse and (0.5, 0.5) otherwise, as released.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import readers
from .nifti import DataError
from .phantom import PHANTOM_CLASSES, PHANTOM_WINDOW
from .preprocess import intensity_settings

ABDOMEN_CT_WINDOW = (-125.0, 275.0)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to read and prepare one dataset.

    ``class_names[i]`` names training index i (``class_names[0] == "background"``);
    ``label_map`` maps each raw label value of the dataset's files to a training index;
    ``window`` is the CT intensity window (None for MRI); ``reader(root)`` lists the cases.
    """

    name: str
    modality: str
    class_names: tuple[str, ...]
    label_map: Mapping[int, int]
    loss_weights: tuple[float, float]
    window: tuple[float, float] | None
    reader: Callable[[Path], list[readers.Case]] = field(repr=False)
    layout: str = ""
    labels_from_dataset_json: bool = False
    modality_from_dataset_json: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def intensity(self) -> dict[str, Any]:
        """The manifest ``intensity`` entry for this spec."""
        return intensity_settings(self.modality, self.window)

    @property
    def label_values(self) -> list[int]:
        """``label_values[i]``: the smallest raw value mapped to training index i."""
        values: dict[int, int] = {}
        for raw, index in sorted(self.label_map.items()):
            values.setdefault(index, raw)
        return [values[i] for i in range(self.num_classes)]

    def read(self, root: str | Path) -> list[readers.Case]:
        """The cases of this dataset found under ``root``."""
        return self.reader(Path(root))


def _identity(names: Sequence[str]) -> tuple[tuple[str, ...], dict[int, int]]:
    class_names = ("background", *names)
    return class_names, {i: i for i in range(len(class_names))}


def _spec(name: str, modality: str, names: Sequence[str], reader, layout: str, **kwargs) -> DatasetSpec:
    class_names, label_map = _identity(names)
    kwargs.setdefault("loss_weights", (0.5, 0.5))
    kwargs.setdefault("window", ABDOMEN_CT_WINDOW if modality == "CT" else None)
    return DatasetSpec(name, modality, class_names, label_map, reader=reader, layout=layout, **kwargs)


_AMOS_CLASSES = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "pancreas",
    "adrenal_right",
    "adrenal_left",
    "duodenum",
    "bladder",
    "prostate_uterus",
)

_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="btcv",
        modality="CT",
        class_names=(
            "background",
            "aorta",
            "gallbladder",
            "kidney_left",
            "kidney_right",
            "liver",
            "pancreas",
            "spleen",
            "stomach",
        ),
        label_map={0: 0, 1: 7, 2: 4, 3: 3, 4: 2, 5: 0, 6: 5, 7: 8, 8: 1, 9: 0, 10: 0, 11: 6, 12: 0, 13: 0},
        loss_weights=(0.4, 0.6),
        window=ABDOMEN_CT_WINDOW,
        reader=readers.read_btcv,
        layout="RawData/Training/img/img0001.nii.gz + RawData/Training/label/label0001.nii.gz",
        aliases=("synapse",),
    ),
    _spec(
        "amos",
        "CT",
        _AMOS_CLASSES,
        functools.partial(readers.read_amos, mr=False),
        "imagesTr/amos_0001.nii.gz + labelsTr/, imagesVa/ + labelsVa/, dataset.json (ids < 500)",
        labels_from_dataset_json=True,
    ),
    _spec(
        "amos_mr",
        "MRI",
        _AMOS_CLASSES,
        functools.partial(readers.read_amos, mr=True),
        "imagesTr/amos_0507.nii.gz + labelsTr/, imagesVa/ + labelsVa/, dataset.json (ids >= 500)",
        labels_from_dataset_json=True,
    ),
    _spec(
        "flare22",
        "CT",
        (
            "liver",
            "kidney_right",
            "spleen",
            "pancreas",
            "aorta",
            "inferior_vena_cava",
            "adrenal_right",
            "adrenal_left",
            "gallbladder",
            "esophagus",
            "stomach",
            "duodenum",
            "kidney_left",
        ),
        readers.read_flare22,
        "images/FLARE22_Tr_0001_0000.nii.gz + labels/FLARE22_Tr_0001.nii.gz (or side by side)",
    ),
    _spec(
        "acdc",
        "MRI",
        ("rv_cavity", "myocardium", "lv_cavity"),
        readers.read_acdc,
        "patient001/patient001_frame01.nii.gz + patient001_frame01_gt.nii.gz + Info.cfg",
    ),
    _spec(
        "word",
        "CT",
        (
            "liver",
            "spleen",
            "kidney_left",
            "kidney_right",
            "stomach",
            "gallbladder",
            "esophagus",
            "pancreas",
            "duodenum",
            "colon",
            "intestine",
            "adrenal",
            "rectum",
            "bladder",
            "femoral_head_left",
            "femoral_head_right",
        ),
        readers.read_word,
        "imagesTr/ labelsTr/ imagesVal/ labelsVal/ imagesTs/ labelsTs/ (word_0001.nii.gz)",
        labels_from_dataset_json=True,
    ),
    _spec(
        "atlas2023",
        "MRI",
        ("liver", "tumour"),
        readers.read_atlas2023,
        "imagesTr/im0.nii.gz + labelsTr/lb0.nii.gz (or images/ + labels/)",
    ),
    DatasetSpec(
        name="generic",
        modality="CT",
        class_names=("background",),
        label_map={0: 0},
        loss_weights=(0.5, 0.5),
        window=ABDOMEN_CT_WINDOW,
        reader=readers.read_generic,
        layout="dataset.json, imagesTr/case_0000.nii.gz (or case.nii.gz) + labelsTr/case.nii.gz [+ imagesTs/labelsTs]",
        labels_from_dataset_json=True,
        modality_from_dataset_json=True,
    ),
    _spec(
        "phantom",
        "CT",
        PHANTOM_CLASSES[1:],
        readers.read_generic,
        "written by `mlla-fast phantom` (generic layout)",
        window=PHANTOM_WINDOW,
        labels_from_dataset_json=True,
    ),
)

_BY_NAME: dict[str, DatasetSpec] = {}
for _s in _SPECS:
    for _name in (_s.name, *_s.aliases):
        _BY_NAME[_name] = _s

DATASETS: list[str] = [s.name for s in _SPECS]
DATASET_ALIASES: dict[str, str] = {alias: s.name for s in _SPECS for alias in s.aliases}


def get_dataset_spec(name: str) -> DatasetSpec:
    """The built-in :class:`DatasetSpec` of a dataset name or alias (case-insensitive)."""
    try:
        return _BY_NAME[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(_BY_NAME)}") from None


def _load_json_arg(value: str | Path | Mapping, what: str) -> Mapping:
    if isinstance(value, Mapping):
        return value
    path = Path(value)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        loaded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{what} file {path}: not valid JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise DataError(f"{what} file {path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _class_names_from(pairs: Mapping[int, tuple[int, str]], source: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """Check a raw -> (index, name) map and turn it into (class_names, label_map)."""
    pairs = dict(pairs)
    pairs.setdefault(0, (0, "background"))
    names: dict[int, str] = {0: "background"}
    for raw, (index, name) in sorted(pairs.items()):
        if index < 0 or index > 255:
            raise DataError(f"{source}: raw value {raw} maps to index {index}; expected 0..255")
        if index and names.setdefault(index, name) != name:
            raise DataError(f"{source}: index {index} is named both {names[index]!r} and {name!r}")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(f"{source}: training indices must be 0..K-1 without gaps; {missing} are not used")
    label_map = {raw: index for raw, (index, _name) in pairs.items()}
    return tuple(names[i] for i in range(len(names))), label_map


def parse_class_map(value: str | Path | Mapping) -> tuple[tuple[str, ...], dict[int, int]]:
    """A user class map, ``{raw value: [index, name]}`` (a dict or a JSON file), as (class_names, label_map).

    Raw value 0 maps to background unless given; indices must be 0..K-1 without gaps and every
    raw value that occurs in the labels must be listed (map unwanted structures to 0).
    """
    source = "class map" if isinstance(value, Mapping) else f"class map {value}"
    loaded = _load_json_arg(value, "class map")
    pairs: dict[int, tuple[int, str]] = {}
    for raw, entry in loaded.items():
        try:
            index, name = entry
            pairs[int(raw)] = (int(index), str(name))
        except (TypeError, ValueError):
            raise DataError(f"{source}: expected raw value -> [index, name], got {raw!r}: {entry!r}") from None
    return _class_names_from(pairs, source)


def class_map_from_dataset_json(labels: Mapping, source: str) -> tuple[tuple[str, ...], dict[int, int]]:
    """A dataset.json ``labels`` entry, MSD ``{"1": "liver"}`` or nnU-Net v2 ``{"liver": 1}``, as (names, label_map).

    Raw values are numbered in increasing order (so 0, 1, 2, ... stay as they are).
    """
    if all(isinstance(v, str) for v in labels.values()):
        try:
            by_raw = {int(k): str(v) for k, v in labels.items()}
        except ValueError:
            raise DataError(f"{source}: MSD-style labels need integer keys, got {list(labels)}") from None
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        by_raw = {int(v): str(k) for k, v in labels.items()}
    else:
        raise DataError(
            f"{source}: 'labels' must map index -> name (MSD) or name -> integer (nnU-Net v2); region "
            f"labels (lists) are not supported, got {dict(labels)}"
        )
    raws = sorted(set(by_raw) | {0})
    return _class_names_from({raw: (i, by_raw.get(raw, "background")) for i, raw in enumerate(raws)}, source)


def parse_split(value: str | Path | Mapping, case_ids: Sequence[str]) -> dict[str, str]:
    """A user split ``{"train": [ids], "val": [ids], "test": [ids]}`` (a dict or JSON file) as ``{id: split}``.

    Every listed id must be one of ``case_ids``; cases not listed are left out.
    """
    source = "split" if isinstance(value, Mapping) else f"split file {value}"
    loaded = _load_json_arg(value, "split")
    unknown_keys = set(loaded) - set(readers.SPLITS)
    if unknown_keys:
        raise DataError(f"{source}: expected keys {list(readers.SPLITS)}, got {sorted(unknown_keys)}")
    known = set(case_ids)
    assignment: dict[str, str] = {}
    for split in readers.SPLITS:
        ids = loaded.get(split, [])
        if not isinstance(ids, list):
            raise DataError(f"{source}: '{split}' must be a list of case ids, got {ids!r}")
        for case_id in map(str, ids):
            if case_id not in known:
                raise DataError(
                    f"{source}: case {case_id!r} ({split}) is not in the dataset; ids look like {sorted(known)[:3]}"
                )
            if case_id in assignment:
                raise DataError(f"{source}: case {case_id!r} is in both {assignment[case_id]!r} and {split!r}")
            assignment[case_id] = split
    return assignment


def resolve_spec(
    name: str,
    data_root: str | Path | None = None,
    classes: str | Path | Mapping | None = None,
    window: Sequence[float] | None = None,
) -> DatasetSpec:
    """The spec of ``name`` with its class map, modality and window settled for one dataset copy.

    Applies, in order: the dataset's ``dataset.json`` under ``data_root`` (labels, and the
    modality for ``generic``), then the user's ``classes`` override and ``window``.
    """
    spec = get_dataset_spec(name)
    meta = readers.read_dataset_json(data_root) if data_root is not None else None
    source = f"{Path(data_root or '.') / 'dataset.json'}"
    if meta is not None and spec.modality_from_dataset_json:
        channels = meta.get("modality") or meta.get("channel_names") or {}
        if isinstance(channels, Mapping) and channels:
            first = str(channels.get("0", next(iter(channels.values()))))
            modality = "CT" if first.strip().upper() == "CT" else "MRI"
            spec = replace(spec, modality=modality, window=spec.window if modality == "CT" else None)
    if classes is not None:
        class_names, label_map = parse_class_map(classes)
        spec = replace(spec, class_names=class_names, label_map=label_map)
    elif meta is not None and spec.labels_from_dataset_json and isinstance(meta.get("labels"), Mapping):
        class_names, label_map = class_map_from_dataset_json(meta["labels"], source)
        spec = replace(spec, class_names=class_names, label_map=label_map)
    elif spec.name == "generic":
        raise DataError(f"{source}: the generic layout needs dataset.json with 'labels' (or pass --classes)")
    if window is not None:
        if spec.modality != "CT":
            raise ValueError(f"--window applies to CT datasets; {spec.name} is {spec.modality} (z-scored)")
        lo, hi = (float(w) for w in window)
        if not hi > lo:
            raise ValueError(f"window must have lo < hi, got ({lo}, {hi})")
        spec = replace(spec, window=(lo, hi))
    return spec
