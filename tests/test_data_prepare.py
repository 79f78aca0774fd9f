"""The phantom, ``prepare`` (cache, idempotence, resume, workers, CLI) and the slice/volume datasets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import mlla_fast.data.prepare as prepare_module
from mlla_fast.cli import main as cli_main
from mlla_fast.data import (
    PHANTOM_CLASSES,
    DataError,
    SliceDataset,
    VolumeDataset,
    augment_slice,
    get_dataset_spec,
    load_manifest,
    make_phantom,
    prepare_dataset,
)

CASES, SIZE = 5, (32, 6)


def _case_files(prepared: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((prepared / "cases").iterdir())}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("phantom"), cases=CASES, seed=3, size=SIZE)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset("phantom", raw, out, progress=False)
    return out


# --- phantom --------------------------------------------------------------------------------------


def test_phantom_is_deterministic(raw, tmp_path):
    again = make_phantom(tmp_path / "again", cases=CASES, seed=3, size=SIZE)
    other = make_phantom(tmp_path / "other", cases=2, seed=4, size=SIZE)
    files = sorted(p.relative_to(raw) for p in raw.rglob("*.nii.gz"))
    assert len(files) == 2 * CASES
    for rel in files:
        a, b = nib.load(raw / rel), nib.load(again / rel)
        assert np.asarray(a.dataobj).tobytes() == np.asarray(b.dataobj).tobytes()
        np.testing.assert_array_equal(a.affine, b.affine)
    first = Path("imagesTr/phantom_000_0000.nii.gz")
    assert not np.array_equal(np.asarray(nib.load(raw / first).dataobj), np.asarray(nib.load(other / first).dataobj))


def test_phantom_rewrite_replaces_earlier_cases(tmp_path):
    make_phantom(tmp_path, cases=4, size=(16, 4))
    make_phantom(tmp_path, cases=2, size=(16, 4))
    assert len(list(tmp_path.rglob("*.nii.gz"))) == 4
    assert [c.id for c in get_dataset_spec("phantom").read(tmp_path)] == ["phantom_000", "phantom_001"]


def test_phantom_content(raw):
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {str(i): n for i, n in enumerate(PHANTOM_CLASSES)} and len(PHANTOM_CLASSES) >= 5
    assert meta["numTraining"] + meta["numTest"] == CASES and meta["numTest"] >= 1
    for path in sorted(raw.glob("labels*/*.nii.gz")):
        label = nib.load(path)
        image = nib.load(raw / path.parent.name.replace("labels", "images") / path.name.replace(".nii", "_0000.nii"))
        data = np.asarray(image.dataobj)
        assert image.shape == label.shape == (SIZE[0], SIZE[0], SIZE[1]) and data.dtype == np.int16
        assert set(np.unique(np.asarray(label.dataobj))) == set(range(len(PHANTOM_CLASSES))), path
        assert data.min() <= -900 and 50 < np.median(data[np.asarray(label.dataobj) == 1]) < 150
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S") and not np.allclose(image.header.get_zooms(), 1)


# --- prepare --------------------------------------------------------------------------------------


def test_manifest_follows_the_interface(prepared):
    manifest = load_manifest(prepared)
    assert manifest["format"] == 1 and manifest["dataset"] == "phantom" and manifest["modality"] == "CT"
    assert manifest["class_names"] == list(PHANTOM_CLASSES) and manifest["num_classes"] == len(PHANTOM_CLASSES)
    assert manifest["loss_weights"] == [0.5, 0.5] and manifest["orientation"] == "RAS"
    assert manifest["intensity"] == {"method": "window", "window": [-150.0, 250.0], "range": [0.0, 1.0]}
    split_ids = [i for s in ("train", "val", "test") for i in manifest["splits"][s]]
    assert sorted(split_ids) == sorted(manifest["cases"]) and len(split_ids) == CASES
    assert all(manifest["splits"][s] for s in ("train", "val", "test"))
    for case_id, entry in manifest["cases"].items():
        image = np.load(prepared / entry["image"], mmap_mode="r")
        label = np.load(prepared / entry["label"], mmap_mode="r")
        assert entry["image"] == f"cases/{case_id}_image.npy" and entry["label"] == f"cases/{case_id}_label.npy"
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert list(image.shape) == list(label.shape) == entry["shape"] == entry["source_shape"]
        assert image.min() >= 0.0 and image.max() <= 1.0 and label.max() < manifest["num_classes"]
        affine = np.array(entry["affine"])
        assert nib.aff2axcodes(affine) == ("R", "A", "S") and affine.shape == (4, 4)
        np.testing.assert_allclose(entry["spacing"], np.abs(np.diag(affine)[:3]))
        assert entry["in_plane_resampled"] is False and Path(entry["source_image"]).is_file()
        # LPS source, RAS prepared: the first two axes are flipped
        source = np.asarray(nib.load(entry["source_label"]).dataobj)
        np.testing.assert_array_equal(label, source[::-1, ::-1, :])


def test_prepare_is_idempotent(raw, prepared):
    before = _case_files(prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    prepare_dataset("phantom", raw, prepared, progress=False)
    assert _case_files(prepared) == before
    assert json.loads((prepared / "manifest.json").read_text()) == manifest


def test_interrupted_prepare_resumes(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_load = prepare_module.load_volume
    crash_on = "phantom_002_0000.nii.gz"

    def crashing_load(path, role="image"):
        if Path(path).name == crash_on:
            raise RuntimeError("simulated crash")
        return real_load(path, role)

    monkeypatch.setattr(prepare_module, "load_volume", crashing_load)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset("phantom", raw, out, progress=False)
    assert not (out / "manifest.json").exists()
    finished = _case_files(out)
    assert sorted(finished) == sorted(
        f"phantom_00{i}{s}" for i in (0, 1) for s in (".json", "_image.npy", "_label.npy")
    )
    monkeypatch.setattr(prepare_module, "load_volume", real_load)
    manifest = prepare_dataset("phantom", raw, out, progress=False)
    after = _case_files(out)
    assert {name: after[name] for name in finished} == finished
    assert len(manifest["cases"]) == CASES and len(after) == 3 * CASES


def test_changed_settings_redo_the_cases(raw, prepared, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("phantom", raw, out, progress=False)
    manifest = prepare_dataset("phantom", raw, out, window=(-50, 50), progress=False)
    case_id = manifest["splits"]["train"][0]
    new = np.load(out / manifest["cases"][case_id]["image"])
    old = np.load(prepared / f"cases/{case_id}_image.npy")
    assert manifest["intensity"]["window"] == [-50.0, 50.0] and not np.array_equal(new, old)


def test_workers_give_the_same_cache(raw, prepared, tmp_path):
    manifest = prepare_dataset("phantom", raw, tmp_path / "out", workers=2, progress=False)
    reference = load_manifest(prepared)
    assert manifest["splits"] == reference["splits"]
    for entry in manifest["cases"].values():
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.load(tmp_path / "out" / entry[key]), np.load(prepared / entry[key]))


def test_cli_phantom_and_prepare(tmp_path, capsys):
    assert cli_main(["phantom", "--out", str(tmp_path / "raw"), "--cases", "3", "--size", "24", "5"]) == 0
    assert cli_main(["prepare", "--dataset", "phantom", "--data-root", str(tmp_path / "raw"),
                     "--out", str(tmp_path / "prepared"), "--spacing", "6", "6"]) == 0  # fmt: skip
    assert "prepared 3 cases of phantom" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "prepared")
    assert all(entry["in_plane_resampled"] for entry in manifest["cases"].values())
    assert cli_main(["prepare", "--dataset", "btcv", "--data-root", str(tmp_path / "none"),
                     "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "BTCV data root folder not found" in capsys.readouterr().err


def test_load_manifest_says_to_run_prepare(tmp_path, prepared):
    with pytest.raises(DataError, match="mlla-fast prepare"):
        load_manifest(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="mlla-fast prepare"):
        load_manifest(tmp_path / "half")
    broken = tmp_path / "broken"
    (broken / "cases").mkdir(parents=True)
    (broken / "manifest.json").write_text((prepared / "manifest.json").read_text())
    with pytest.raises(DataError, match="is missing; run `mlla-fast prepare"):
        load_manifest(broken)
    (broken / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="missing keys"):
        load_manifest(broken)


# --- datasets -------------------------------------------------------------------------------------


def test_slice_dataset_items(prepared):
    ds = SliceDataset(prepared, "train", image_size=64, augment=False)
    manifest = load_manifest(prepared)
    assert ds.num_classes == len(PHANTOM_CLASSES) and ds.class_names == list(PHANTOM_CLASSES)
    assert len(ds) == sum(manifest["cases"][i]["shape"][2] for i in manifest["splits"]["train"])
    image, label = ds[len(ds) - 1]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert label.shape == (64, 64) and label.dtype == torch.int64
    assert int(label.min()) >= 0 and int(label.max()) < ds.num_classes
    case_id, z = ds.slice_location(len(ds) - 1)
    source = np.load(prepared / manifest["cases"][case_id]["label"])[:, :, z]
    assert set(np.unique(label.numpy())) <= set(np.unique(source))
    native = SliceDataset(prepared, "train", image_size=SIZE[0], augment=False)
    np.testing.assert_array_equal(native[len(ds) - 1][1].numpy(), source)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 1, 64, 64) and labels.shape == (4, 64, 64)


def test_slice_dataset_is_deterministic(prepared):
    a = SliceDataset(prepared, "train", image_size=48, augment=True, seed=1)
    b = pickle.loads(pickle.dumps(SliceDataset(prepared, "train", image_size=48, augment=True, seed=1)))
    indices = range(0, len(a), 2)
    for i in indices:
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i], strict=True))
    a.set_epoch(1)
    changed = [not torch.equal(a[i][1], b[i][1]) for i in indices]
    assert any(changed)
    b.set_epoch(1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in indices)


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    label = (np.arange(24 * 20).reshape(24, 20) % 7).astype(np.uint8)
    kinds = set()
    for _ in range(40):
        image, out = augment_slice(label.astype(np.float32), label, rng)
        np.testing.assert_array_equal(image, out.astype(np.float32))
        kinds.add("rot90" if out.shape != label.shape or not np.any(out == 0) else "other")
        kinds.add("identity" if np.array_equal(out, label) else "changed")
    assert kinds == {"rot90", "other", "identity", "changed"}


def test_volume_dataset(prepared):
    ds = VolumeDataset(prepared, "test")
    manifest = load_manifest(prepared)
    assert len(ds) == len(manifest["splits"]["test"]) and ds.num_classes == len(PHANTOM_CLASSES)
    item = ds[0]
    entry = manifest["cases"][item["id"]]
    assert item["image"].dtype == np.float32 and item["label"].dtype == np.uint8
    assert list(item["image"].shape) == list(item["label"].shape) == entry["shape"]
    assert item["spacing"] == tuple(entry["spacing"]) and item["affine"].shape == (4, 4)
    assert ds.meta(0) == entry
    with pytest.raises(ValueError, match="unknown split"):
        VolumeDataset(prepared, "validation")


def test_empty_split_is_an_error(raw, tmp_path):
    prepare_dataset("phantom", raw, tmp_path, split={"train": ["phantom_000"]}, progress=False)
    assert len(SliceDataset(tmp_path, "train", image_size=32)) == SIZE[1]
    with pytest.raises(DataError, match=r"'val' of .* has no cases"):
        SliceDataset(tmp_path, "val")
