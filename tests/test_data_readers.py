"""Raw data in: each dataset reader on tiny volumes in its own layout, bad input, and preprocessing.

Volumes are 8x8x3 NIfTI files written by the tests in each dataset's exact naming.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlla_fast.data import DataError, get_dataset_spec, load_and_preprocess, prepare_dataset, restore_to_source
from mlla_fast.data.nifti import label_indices, load_volume
from mlla_fast.data.preprocess import plan_geometry, to_prepared_grid, window_intensity, zscore_intensity
from mlla_fast.data.readers import acdc_split, holdout_split
from mlla_fast.data.registry import parse_class_map, resolve_spec

SHAPE = (8, 8, 3)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def write_case(image: Path, label: Path | None, raw_values=(0, 1, 2), seed: int = 0, affine=None) -> np.ndarray:
    """A random CT-like image and a label using ``raw_values``; returns the label array."""
    rng = np.random.default_rng(seed)
    write_nifti(image, rng.uniform(-300, 300, SHAPE).astype(np.float32), affine)
    lab = rng.choice(np.array(raw_values, dtype=np.uint8), size=SHAPE)
    if label is not None:
        write_nifti(label, lab, affine)
    return lab


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# --- one writer per dataset layout: returns the expected {case id: split} -------------------------


def layout_btcv(root: Path) -> dict[str, str]:
    base = root / "RawData" / "Training"
    for n in (1, 5, 6):
        write_case(base / "img" / f"img{n:04d}.nii.gz", base / "label" / f"label{n:04d}.nii.gz", range(14), n)
    write_nifti(root / "RawData" / "Testing" / "img" / "img0061.nii.gz", np.arange(192.0).reshape(SHAPE))
    return {"case0001": "test", "case0005": "train", "case0006": "train"}


def _amos_json(root: Path) -> None:
    names = ["background", "spleen", "kidney right", "kidney left", "gallbladder", "esophagus", "liver", "stomach",
             "aorta", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
             "prostate/uterus"]  # fmt: skip
    write_json(root / "dataset.json", {"labels": {str(i): n for i, n in enumerate(names)}, "modality": {"0": "CT"}})


def layout_amos(root: Path) -> dict[str, str]:
    _amos_json(root)
    for n in (1, 2, 3, 4, 540):
        write_case(root / "imagesTr" / f"amos_{n:04d}.nii.gz", root / "labelsTr" / f"amos_{n:04d}.nii.gz", range(16), n)
    for n in (10, 550):
        write_case(root / "imagesVa" / f"amos_{n:04d}.nii.gz", root / "labelsVa" / f"amos_{n:04d}.nii.gz", range(16), n)
    write_case(root / "imagesTs" / "amos_0100.nii.gz", None)
    split = holdout_split(["amos_0001", "amos_0002", "amos_0003", "amos_0004"], 0.1, 0.0)
    return {**split, "amos_0010": "test"}


def layout_amos_mr(root: Path) -> dict[str, str]:
    layout_amos(root)
    return {"amos_0540": "train", "amos_0550": "test"}


def layout_flare22(root: Path) -> dict[str, str]:
    base = root / "FLARE22_LabeledCase50"
    write_case(base / "images" / "FLARE22_Tr_0001_0000.nii.gz", base / "labels" / "FLARE22_Tr_0001.nii.gz", range(14))
    write_case(base / "images" / "FLARE22_Tr_0002_0000.nii.gz", base / "labels" / "FLARE22_Tr_0002.nii.gz", range(14))
    # side by side in one folder is accepted too
    write_case(root / "more" / "FLARE22_Tr_0003_0000.nii.gz", root / "more" / "FLARE22_Tr_0003.nii.gz", range(14))
    return holdout_split(["FLARE22_Tr_0001", "FLARE22_Tr_0002", "FLARE22_Tr_0003"], 0.1, 0.2)


def layout_acdc(root: Path) -> dict[str, str]:
    expected = {}
    for patient, (ed, es) in {1: (1, 12), 15: (1, 9), 17: (1, 14)}.items():
        folder = root / "database" / "training" / f"patient{patient:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n")
        write_nifti(folder / f"patient{patient:03d}_4d.nii.gz", np.zeros((*SHAPE, 4), np.int16))
        for frame in (ed, es):
            stem = f"patient{patient:03d}_frame{frame:02d}"
            write_case(folder / f"{stem}.nii.gz", folder / f"{stem}_gt.nii.gz", range(4), patient + frame)
            expected[stem] = acdc_split(patient)
    return expected


def layout_word(root: Path) -> dict[str, str]:
    for n, suffix in ((1, "Tr"), (2, "Tr"), (3, "Val"), (4, "Ts")):
        write_case(root / f"images{suffix}" / f"word_{n:04d}.nii.gz", root / f"labels{suffix}" / f"word_{n:04d}.nii.gz",
                   range(17), n)  # fmt: skip
    return {"word_0001": "train", "word_0002": "train", "word_0003": "val", "word_0004": "test"}


def layout_atlas2023(root: Path) -> dict[str, str]:
    base = root / "atlas-train-dataset-1.0.1" / "train"
    for n in range(3):
        write_case(base / "imagesTr" / f"im{n}.nii.gz", base / "labelsTr" / f"lb{n}.nii.gz", range(3), n)
    return holdout_split(["im0", "im1", "im2"], 0.1, 0.2)


def layout_generic_nnunet(root: Path) -> dict[str, str]:
    """nnU-Net v2: channel-suffixed images, labels name -> index, no training list, no test labels."""
    labels = {"background": 0, "left": 1, "right": 2}
    write_json(root / "dataset.json", {"channel_names": {"0": "T2"}, "labels": labels, "file_ending": ".nii.gz"})
    ids = [f"prostate_{n:02d}" for n in range(4)]
    for n, case_id in enumerate(ids):
        write_case(root / "imagesTr" / f"{case_id}_0000.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz", seed=n)
    write_case(root / "imagesTs" / "prostate_10_0000.nii.gz", None)
    return holdout_split(ids, 0.1, 0.2)


def layout_generic_msd(root: Path) -> dict[str, str]:
    """MSD: plain names, labels index -> name, a training list, labelled test images."""
    training = []
    for n in range(3):
        write_case(root / "imagesTr" / f"liver_{n}.nii.gz", root / "labelsTr" / f"liver_{n}.nii.gz", seed=n)
        training.append({"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"})
    write_case(root / "imagesTr" / "liver_9.nii.gz", root / "labelsTr" / "liver_9.nii.gz", seed=9)  # not listed
    write_case(root / "imagesTs" / "liver_7.nii.gz", root / "labelsTs" / "liver_7.nii.gz", seed=7)
    write_case(root / "imagesTs" / "liver_8.nii.gz", root / "labelsTs" / "liver_8.nii.gz", seed=8)  # not listed
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"}, "training": training,
            "test": ["./imagesTs/liver_7.nii.gz"]}  # fmt: skip
    write_json(root / "dataset.json", meta)
    return {**holdout_split(["liver_0", "liver_1", "liver_2"], 0.1, 0.0), "liver_7": "test"}


LAYOUTS = {
    "btcv": layout_btcv,
    "amos": layout_amos,
    "amos_mr": layout_amos_mr,
    "flare22": layout_flare22,
    "acdc": layout_acdc,
    "word": layout_word,
    "atlas2023": layout_atlas2023,
    "generic-nnunet": layout_generic_nnunet,
    "generic-msd": layout_generic_msd,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reader_finds_cases_and_splits(tmp_path, layout):
    name = layout.split("-")[0]
    expected = LAYOUTS[layout](tmp_path)
    spec = get_dataset_spec(name)
    cases = spec.read(tmp_path)
    assert {c.id: c.split for c in cases} == expected
    for case in cases:
        assert case.image.is_file() and case.label.is_file()
        assert "_4d" not in case.image.name


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_prepare_each_layout(tmp_path, layout):
    """Every layout goes through prepare; labels arrive as training indices of its class map."""
    name = layout.split("-")[0]
    expected = LAYOUTS[layout](tmp_path / "raw")
    manifest = prepare_dataset(name, tmp_path / "raw", tmp_path / "prepared", progress=False)
    assert {i: s for s, ids in manifest["splits"].items() for i in ids} == expected
    spec = resolve_spec(name, tmp_path / "raw")
    assert manifest["class_names"] == list(spec.class_names) and manifest["class_names"][0] == "background"
    assert manifest["modality"] == spec.modality
    lut = np.zeros(256, dtype=np.uint8)
    for raw, index in spec.label_map.items():
        lut[raw] = index
    for entry in manifest["cases"].values():
        raw = np.asarray(nib.load(entry["source_label"]).dataobj)
        label = np.load(tmp_path / "prepared" / entry["label"])
        image = np.load(tmp_path / "prepared" / entry["image"])
        assert label.dtype == np.uint8 and image.dtype == np.float32 and label.shape == image.shape == SHAPE
        np.testing.assert_array_equal(label, lut[raw])  # identity affines: no reorientation


def test_dataset_specific_metadata(tmp_path):
    assert get_dataset_spec("synapse") is get_dataset_spec("btcv")
    assert get_dataset_spec("btcv").loss_weights == (0.4, 0.6)
    assert all(get_dataset_spec(n).loss_weights == (0.5, 0.5) for n in ("amos", "acdc", "word", "phantom"))
    assert get_dataset_spec("acdc").intensity["method"] == "zscore"
    assert get_dataset_spec("btcv").intensity == {"method": "window", "window": [-125.0, 275.0], "range": [0.0, 1.0]}
    counts = {"btcv": 9, "amos": 16, "amos_mr": 16, "flare22": 14, "acdc": 4, "word": 17, "atlas2023": 3}
    assert {n: get_dataset_spec(n).num_classes for n in counts} == counts
    layout_generic_nnunet(tmp_path)
    spec = resolve_spec("generic", tmp_path)
    assert spec.modality == "MRI" and spec.class_names == ("background", "left", "right") and spec.window is None
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset_spec("imagenet")


def test_btcv_remapping_follows_transunet(tmp_path):
    spec = get_dataset_spec("btcv")
    expected = {8: "aorta", 4: "gallbladder", 3: "kidney_left", 2: "kidney_right", 6: "liver", 11: "pancreas",
                1: "spleen", 7: "stomach"}  # fmt: skip
    assert {raw: spec.class_names[spec.label_map[raw]] for raw in expected} == expected
    assert [spec.label_map[raw] for raw in (5, 9, 10, 12, 13)] == [0] * 5
    assert spec.label_values == [0, 8, 4, 3, 2, 6, 11, 1, 7]
    raw = np.arange(14, dtype=np.uint8).reshape(14, 1, 1)
    base = tmp_path / "RawData" / "Training"
    write_nifti(base / "img" / "img0005.nii.gz", np.arange(14.0).reshape(14, 1, 1))
    write_nifti(base / "label" / "label0005.nii.gz", raw)
    manifest = prepare_dataset("synapse", tmp_path, tmp_path / "out", progress=False)
    label = np.load(tmp_path / "out" / manifest["cases"]["case0005"]["label"])
    assert label.ravel().tolist() == [0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0]


def test_class_and_split_overrides(tmp_path):
    expected = layout_word(tmp_path / "raw")
    classes = {str(raw): [0, "background"] for raw in range(17)} | {"1": [1, "liver"], "2": [2, "spleen"]}
    split = {"train": ["word_0001"], "val": [], "test": ["word_0004", "word_0003"]}
    write_json(tmp_path / "classes.json", classes)
    write_json(tmp_path / "split.json", split)
    manifest = prepare_dataset("word", tmp_path / "raw", tmp_path / "out", classes=tmp_path / "classes.json",
                               split=tmp_path / "split.json", window=(-100, 100), progress=False)  # fmt: skip
    assert len(expected) == 4 and sorted(manifest["cases"]) == ["word_0001", "word_0003", "word_0004"]
    assert manifest["splits"] == {"train": ["word_0001"], "val": [], "test": ["word_0003", "word_0004"]}
    assert manifest["class_names"] == ["background", "liver", "spleen"]
    assert manifest["intensity"]["window"] == [-100.0, 100.0]
    for entry in manifest["cases"].values():
        assert np.load(tmp_path / "out" / entry["label"]).max() <= 2
    with pytest.raises(DataError, match="word_9999"):
        prepare_dataset("word", tmp_path / "raw", tmp_path / "out2", split={"train": ["word_9999"]}, progress=False)
    with pytest.raises(DataError, match="without gaps"):
        parse_class_map({"1": [2, "liver"]})
    with pytest.raises(ValueError, match="CT datasets"):
        resolve_spec("acdc", window=(0, 1))


def test_label_indices_for_any_raw_values():
    label_map = {0: 0, 3: 1, -2: 2, 70000: 3}
    raw = np.array([[0, 3, -2, 70000], [3, 3, 0, 0]])
    expected = [[0, 1, 2, 3], [1, 1, 0, 0]]
    np.testing.assert_array_equal(label_indices(raw, label_map, Path("x.nii.gz")), expected)
    np.testing.assert_array_equal(label_indices(raw[:, :2].astype(np.float32), label_map, Path("x")), [[0, 1], [1, 1]])
    with pytest.raises(DataError, match=r"x\.nii\.gz: values \[5\] are not in the class map"):
        label_indices(np.array([0, 5]), label_map, Path("x.nii.gz"))


def test_holdout_split_is_fixed_and_complete():
    ids = [f"c{i:02d}" for i in range(50)]
    split = holdout_split(ids, 0.1, 0.2)
    assert split == holdout_split(reversed(ids), 0.1, 0.2)
    assert [list(split.values()).count(s) for s in ("train", "val", "test")] == [35, 5, 10]
    assert set(holdout_split(["a", "b"], 0.1, 0.2).values()) == {"train"}
    patients = (1, 14, 15, 16, 17, 20, 21, 100)
    assert [acdc_split(p) for p in patients] == ["train", "train", "val", "val", "test", "test", "train", "test"]
    assert [acdc_split(p) for p in range(1, 101)].count("train") == 70


# --- bad input ------------------------------------------------------------------------------------


def _generic(root: Path, n: int = 3) -> Path:
    write_json(root / "dataset.json", {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "2": "b"}})
    for i in range(n):
        write_case(root / "imagesTr" / f"c{i}_0000.nii.gz", root / "labelsTr" / f"c{i}.nii.gz", seed=i)
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _replace_image(data: np.ndarray):
    def breaker(root: Path) -> Path:
        return write_nifti(root / "imagesTr" / "c1_0000.nii.gz", data)

    return breaker


def _label_with(fn):
    def breaker(root: Path) -> Path:
        path = root / "labelsTr" / "c1.nii.gz"
        img = nib.load(path)
        return write_nifti(path, *fn(np.asarray(img.dataobj), img.affine))

    return breaker


def _image_without_label(root: Path) -> Path:
    (root / "labelsTr" / "c1.nii.gz").unlink()
    return root / "imagesTr" / "c1_0000.nii.gz"


def _truncated(root: Path) -> Path:
    path = root / "imagesTr" / "c1_0000.nii.gz"
    # a bigger volume, so the cut falls in the compressed data, not the header
    write_nifti(path, np.random.default_rng(0).normal(size=(8, 8, 3)).astype(np.float64))
    _truncate(path)
    return path


def _garbage(root: Path) -> Path:
    path = root / "imagesTr" / "c1_0000.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    return path


def _not_gzip(root: Path) -> Path:
    path = root / "labelsTr" / "c1.nii.gz"
    path.write_bytes(b"\x00" * 100)
    return path


BAD_INPUTS = {
    "image without a label": (_image_without_label, "has no label"),
    "shape mismatch": (_label_with(lambda a, aff: (a[:, :, :2], aff)), "does not match"),
    "affine mismatch": (_label_with(lambda a, aff: (a, np.diag([2.0, 1.0, 1.0, 1.0]))), "affine does not match"),
    "truncated .nii.gz": (_truncated, "truncated or corrupt"),
    "corrupt header": (_garbage, "cannot read"),
    "not gzip at all": (_not_gzip, "cannot read"),
    "label outside the class map": (_label_with(lambda a, aff: (np.where(a == 2, 7, a), aff)), "not in the class map"),
    "non-integer label": (_label_with(lambda a, aff: (a.astype(np.float32) + 0.5, aff)), "integer label values"),
    "constant image": (_replace_image(np.full(SHAPE, -1000, np.int16)), "every voxel has the value"),
    "zero-size image": (_replace_image(np.zeros((8, 0, 3), np.float32)), "zero-size axis"),
    "4-D image": (_replace_image(np.ones((*SHAPE, 2), np.float32)), "expected a 3-D volume"),
    "NaN image": (_replace_image(np.full(SHAPE, np.nan, np.float32)), "NaN"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_input_is_named(tmp_path, problem, caplog):
    breaker, message = BAD_INPUTS[problem]
    root = _generic(tmp_path / "raw")
    bad_file = breaker(root)
    with pytest.raises(DataError, match=message) as info:
        prepare_dataset("generic", root, tmp_path / "out", progress=False)
    assert str(bad_file) in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
    if problem == "image without a label":
        return  # a reader error: the case list itself is wrong, so --skip-bad does not apply
    with caplog.at_level(logging.WARNING, logger="mlla_fast.data.prepare"):
        manifest = prepare_dataset("generic", root, tmp_path / "out", skip_bad=True, progress=False)
    assert sorted(manifest["cases"]) == ["c0", "c2"] and list(manifest["skipped"]) == ["c1"]
    assert "c1" not in [i for ids in manifest["splits"].values() for i in ids]
    assert "skipped 1 bad case" in caplog.text and str(bad_file) in caplog.text


def test_missing_folders_and_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_dataset("word", tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "word" / "imagesTr").mkdir(parents=True)
    with pytest.raises(DataError, match="labelsTr"):
        get_dataset_spec("word").read(tmp_path / "word")
    with pytest.raises(DataError, match=r"dataset\.json not found"):
        get_dataset_spec("generic").read(tmp_path / "word")
    with pytest.raises(DataError, match="image file not found"):
        load_volume(tmp_path / "missing.nii.gz")
    root = _generic(tmp_path / "listed", 1)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = [{"image": "./imagesTr/c5.nii.gz", "label": "./labelsTr/c5.nii.gz"}]
    write_json(root / "dataset.json", meta)
    with pytest.raises(DataError, match=r"c5\.nii\.gz listed in"):
        get_dataset_spec("generic").read(root)
    folder = tmp_path / "acdc" / "patient002"
    folder.mkdir(parents=True)
    write_case(folder / "patient002_frame01.nii.gz", folder / "patient002_frame01_gt.nii.gz")
    with pytest.raises(DataError, match=r"Info\.cfg"):
        get_dataset_spec("acdc").read(tmp_path / "acdc")
    (folder / "Info.cfg").write_text("ED: 1\nES: 7\n")
    with pytest.raises(DataError, match="patient002_frame07"):
        get_dataset_spec("acdc").read(tmp_path / "acdc")


# --- preprocessing --------------------------------------------------------------------------------


def test_window_and_zscore_known_values():
    out = window_intensity(np.array([-1000, -125, 75, 175, 275, 3000], dtype=np.int16), (-125, 275))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 0.75, 1, 1])
    data = np.array([0.0, 0.0, 1.0, 2.0, 3.0])
    z = zscore_intensity(data)
    std = np.sqrt(2.0 / 3.0)  # of the non-zero voxels 1, 2, 3 (mean 2)
    np.testing.assert_allclose(z, (data - 2.0) / std, rtol=1e-6)
    np.testing.assert_allclose(zscore_intensity(np.array([1.0, 3.0])), [-1.0, 1.0])


AFFINES = {
    "LPS": np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 90], [0, 0, 2.5, -40], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, 1.5, 3], [-0.7, 0, 0, 5], [0, 0.9, 0, 7], [0, 0, 0, 1]]),
    "oblique": np.array([[0.98, -0.17, 0, 0], [0.17, 0.98, 0, 0], [0, 0, 3, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_reorientation_matches_as_closest_canonical(name):
    affine = AFFINES[name]
    data = np.arange(np.prod((5, 6, 7)), dtype=np.float32).reshape(5, 6, 7)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    geometry = plan_geometry(data.shape, affine)
    np.testing.assert_array_equal(to_prepared_grid(data, geometry, order=1), np.asarray(canonical.dataobj))
    np.testing.assert_allclose(geometry.affine, canonical.affine, atol=1e-6)
    assert nib.aff2axcodes(geometry.affine) == ("R", "A", "S")


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("spacing", [None, (0.5, 0.4)])
def test_prepare_then_restore_gives_the_source_label(tmp_path, name, spacing):
    """prepare -> restore_to_source is the identity on the label, voxel for voxel (also when upsampled)."""
    root = tmp_path / "raw"
    write_json(root / "dataset.json", {"modality": {"0": "CT"}, "labels": {"0": "bg", "1": "a", "2": "b"}})
    label = write_case(root / "imagesTr" / "c0_0000.nii.gz", root / "labelsTr" / "c0.nii.gz", affine=AFFINES[name])
    manifest = prepare_dataset("generic", root, tmp_path / "out", spacing=spacing, progress=False)
    entry = manifest["cases"]["c0"]
    assert entry["in_plane_resampled"] == (spacing is not None)
    if spacing is not None:
        np.testing.assert_allclose(entry["spacing"][:2], spacing, rtol=0.15)
        assert np.prod(entry["shape"]) > np.prod(SHAPE)
    prepared = np.load(tmp_path / "out" / entry["label"])
    np.testing.assert_array_equal(restore_to_source(prepared, entry), label)
    image, meta = load_and_preprocess(root / "imagesTr" / "c0_0000.nii.gz", manifest)
    np.testing.assert_array_equal(image, np.load(tmp_path / "out" / entry["image"]))
    for key in ("shape", "spacing", "affine", "source_shape", "source_affine", "in_plane_resampled"):
        np.testing.assert_allclose(np.asarray(meta[key], dtype=float), np.asarray(entry[key], dtype=float))
    np.testing.assert_array_equal(restore_to_source(prepared, meta), label)
    with pytest.raises(DataError, match="does not match the prepared shape"):
        restore_to_source(prepared[:-1], meta)


def test_resampling_keeps_the_physical_extent():
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    geometry = plan_geometry((10, 8, 4), affine, (1.0, 1.5))
    assert geometry.shape == (20, 16, 4) and geometry.spacing == (1.0, 1.5, 5.0)
    # the outer voxel edges stay at the same place
    for corner_old, corner_new in (((-0.5, -0.5, 0), (-0.5, -0.5, 0)), ((9.5, 7.5, 0), (19.5, 15.5, 0))):
        np.testing.assert_allclose(affine @ [*corner_old, 1], geometry.affine @ [*corner_new, 1])
