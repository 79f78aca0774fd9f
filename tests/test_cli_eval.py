"""evaluate, predict, info and demo from the command line, on a tiny run trained on the phantom."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from train_helpers import make_prepared, run_cli, train_args

from mlla_fast.cli import main
from mlla_fast.evaluate import format_table


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prepared = make_prepared(root)
    run = root / "run"
    done = run_cli(train_args(prepared, run, iterations=4, val_every=2))
    assert done.returncode == 0, done.stderr
    return root, prepared, run


@pytest.mark.parametrize("convention", ["released", "present"])
def test_evaluate_writes_csv_summary_table_nifti_and_overlays(trained, convention):
    _, prepared, run = trained
    done = run_cli(["evaluate", "--run", str(run), "--convention", convention, "--save-nifti", "--overlays", "2",
                    "--device", "cpu"])
    assert done.returncode == 0, done.stderr
    out = run / "eval_test_best"
    summary = json.loads((out / f"summary_{convention}.json").read_text())
    assert summary["convention"] == convention and summary["split"] == "test" and summary["cases"] == 1
    classes = ["liver", "kidney_left", "kidney_right", "spleen", "aorta"]
    assert list(summary["classes"]) == classes
    assert f"{convention} convention" in done.stdout
    for name in classes:
        assert name in done.stdout
    with open(out / f"per_case_{convention}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(classes) and set(rows[0]) == {"case", "class", "dice", "hd95_mm", "hd95_vox"}
    dice = [float(r["dice"]) for r in rows]
    assert summary["mean"]["dice"] == pytest.approx(float(np.mean(dice)), abs=1e-6)
    assert len(list((out / "overlays").glob("*.png"))) == 2

    manifest = json.loads((prepared / "manifest.json").read_text())
    test_id = manifest["splits"]["test"][0]
    nifti = nib.load(str(out / "predictions" / f"{test_id}.nii.gz"))
    assert nifti.shape == tuple(manifest["cases"][test_id]["shape"])
    assert np.asarray(nifti.dataobj).dtype == np.uint8
    np.testing.assert_allclose(nifti.affine, manifest["cases"][test_id]["affine"], atol=1e-4)


def test_predict_writes_uint8_label_maps_on_the_input_grid(trained, tmp_path):
    root, _, run = trained
    images = sorted((root / "raw" / "imagesTs").glob("*.nii.gz"))
    done = run_cli(["predict", "--run", str(run), "--input", str(root / "raw" / "imagesTs"), "--output",
                    str(tmp_path / "out"), "--device", "cpu", "--checkpoint", "last"])
    assert done.returncode == 0, done.stderr
    for image in images:
        source = nib.load(str(image))
        label = nib.load(str(tmp_path / "out" / image.name))
        assert label.shape == source.shape
        np.testing.assert_array_equal(label.affine, source.affine)
        assert label.header.get_data_dtype() == np.uint8
        values = np.asarray(label.dataobj)
        assert values.dtype == np.uint8 and values.max() < 6
    single = run_cli(["predict", "--run", str(run), "--input", str(images[0]), "--output", str(tmp_path / "one"),
                      "--device", "cpu"])
    assert single.returncode == 0, single.stderr
    assert [p.name for p in (tmp_path / "one").iterdir()] == [images[0].name]


def test_predict_and_evaluate_errors_say_what_to_do(trained, tmp_path, capsys):
    *_, run = trained
    assert main(["predict", "--run", str(run), "--input", str(tmp_path / "nope.nii.gz"), "--output",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "no_run")]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "unprepared")]) == 2
    assert "mlla-fast prepare" in capsys.readouterr().err


def test_format_table_has_class_rows_and_metric_columns():
    summary = {"classes": {"liver": {"dice": 0.9, "hd95_mm": 3.0, "hd95_vox": 1.0},
                           "aorta": {"dice": math.nan, "hd95_mm": math.nan, "hd95_vox": math.nan}},
               "mean": {"dice": 0.9, "hd95_mm": 3.0, "hd95_vox": 1.0}}
    lines = format_table(summary).splitlines()
    assert lines[0].split() == ["class", "Dice", "HD95", "mm", "HD95", "vox"]
    assert lines[1].split() == ["liver", "0.9000", "3.00", "1.00"]
    assert lines[2].split() == ["aorta", "nan", "nan", "nan"]
    assert lines[3].split()[0] == "mean"


def test_info_names_versions_and_the_auto_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "triton:" in out and 'backend "auto":' in out


@pytest.mark.slow
def test_demo_runs_end_to_end_with_a_fixed_iteration_count(tmp_path):
    done = run_cli(["demo", "--out", str(tmp_path / "demo"), "--iterations", "2", "--device", "cpu", "--backend",
                    "torch"], timeout=400)
    assert done.returncode == 0, done.stderr
    assert "mean foreground Dice" in done.stdout and "aorta" in done.stdout
    evaluation = tmp_path / "demo" / "run" / "eval_test_best"
    assert (evaluation / "summary_released.json").is_file()
    assert len(list((evaluation / "overlays").glob("*.png"))) == 4
    assert len(list((evaluation / "predictions").glob("*.nii.gz"))) == 3
