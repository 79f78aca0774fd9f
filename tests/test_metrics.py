"""Known-value tests of Dice, HD95 (with anisotropic spacing) and the two empty-class conventions."""

import itertools
import math

import numpy as np
import pytest

from mlla_fast.metrics import case_scores, class_scores, dice_coefficient, hd95, summarize, surface_distances


def cube(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return mask


def brute_force_hd95(a, b, spacing):
    """HD95 from all pairwise distances between surface voxels (a voxel with a 6-neighbour outside)."""

    def surface_points(mask):
        padded = np.pad(mask, 1)
        points = []
        for idx in zip(*np.nonzero(mask), strict=True):
            p = np.array(idx) + 1
            if any(not padded[tuple(p + d)] for d in itertools.chain(np.eye(3, dtype=int), -np.eye(3, dtype=int))):
                points.append(idx)
        return np.array(points, dtype=float) * np.asarray(spacing)

    pa, pb = surface_points(a), surface_points(b)
    d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_dice_known_values():
    a = np.zeros(10, dtype=bool)
    b = np.zeros(10, dtype=bool)
    a[0:4] = True
    b[2:4] = True
    assert dice_coefficient(a, b) == pytest.approx(2 * 2 / 6)
    assert dice_coefficient(a, a) == 1.0
    assert dice_coefficient(a, ~a) == 0.0
    assert math.isnan(dice_coefficient(np.zeros(3, bool), np.zeros(3, bool)))


@pytest.mark.parametrize("k", [1, 3])
def test_hd95_of_plates_offset_by_k_voxels_with_anisotropic_spacing(k):
    spacing = (2.5, 0.7, 4.0)
    a = cube((12, 8, 9), (2, 1, 1), (3, 7, 8))
    b = cube((12, 8, 9), (2 + k, 1, 1), (3 + k, 7, 8))
    # every surface voxel of either plate is exactly k voxels (k * 2.5 mm) from the other
    assert hd95(a, b, spacing) == pytest.approx(k * 2.5)
    assert hd95(a, b) == pytest.approx(k)
    np.testing.assert_allclose(surface_distances(a, b, spacing), k * 2.5)


def test_hd95_of_offset_cubes_matches_brute_force():
    spacing = (2.0, 1.0, 3.0)
    a = cube((14, 12, 12), (2, 2, 2), (8, 8, 7))
    b = cube((14, 12, 12), (4, 3, 2), (10, 9, 8))
    assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))
    assert hd95(a, b) == pytest.approx(brute_force_hd95(a, b, (1, 1, 1)))
    # a's farthest surface voxels (the edge x=2, y=2) are 2 voxels along x (2 mm each) and 1 along y from b
    assert surface_distances(a, b, spacing).max() == pytest.approx(math.hypot(2 * 2.0, 1 * 1.0))


def test_hd95_identical_masks_and_masks_touching_the_border():
    a = cube((5, 5, 5), (0, 0, 0), (5, 3, 5))
    assert hd95(a, a, (1, 2, 3)) == 0.0
    assert hd95(a, cube((5, 5, 5), (0, 0, 0), (5, 4, 5)), (1, 2, 3)) == pytest.approx(2.0)


def test_hd95_rejects_empty_masks():
    with pytest.raises(ValueError, match="non-empty"):
        hd95(np.zeros((3, 3, 3), bool), cube((3, 3, 3), (0, 0, 0), (1, 1, 1)))


SPACING = (2.0, 1.0, 3.0)
FULL = cube((4, 5, 6), (1, 1, 1), (3, 4, 5))
EMPTY = np.zeros((4, 5, 6), dtype=bool)
DIAG_VOX = math.sqrt(4**2 + 5**2 + 6**2)
DIAG_MM = math.sqrt(8**2 + 5**2 + 18**2)


@pytest.mark.parametrize(
    "pred, truth, released, present",
    [
        (FULL, FULL, (1.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
        (EMPTY, FULL, (0.0, 0.0, 0.0), (0.0, DIAG_MM, DIAG_VOX)),
        (FULL, EMPTY, (1.0, 0.0, 0.0), (math.nan,) * 3),
        (EMPTY, EMPTY, (0.0, 0.0, 0.0), (math.nan,) * 3),
    ],
    ids=["both", "empty-prediction", "empty-truth", "both-empty"],
)
def test_conventions_for_empty_classes(pred, truth, released, present):
    for convention, expected in (("released", released), ("present", present)):
        got = class_scores(pred, truth, SPACING, convention)
        np.testing.assert_allclose([got["dice"], got["hd95_mm"], got["hd95_vox"]], expected, err_msg=convention)


def test_case_scores_and_summary_leave_nan_out_of_the_means():
    truth = np.zeros((6, 6, 2), dtype=np.uint8)
    truth[0:2, 0:2] = 1
    pred = truth.copy()
    pred[4:6, 4:6] = 2  # class 2 predicted but absent from the truth
    cases = {
        "a": case_scores(pred, truth, 3, (1, 1, 1), "present"),
        "b": case_scores(np.zeros_like(truth), truth, 3, (1, 1, 1), "present"),
    }
    assert math.isnan(cases["a"][2]["dice"])
    summary = summarize(cases, ["background", "one", "two"])
    assert summary["classes"]["one"]["dice"] == pytest.approx(0.5)  # mean of 1 and 0
    assert math.isnan(summary["classes"]["two"]["dice"])
    assert summary["mean"]["dice"] == pytest.approx(0.5)  # class "two" has no value: left out
    released = {k: case_scores(p, truth, 3, (1, 1, 1), "released") for k, p in (("a", pred), ("b", truth))}
    assert summarize(released, ["background", "one", "two"])["classes"]["two"]["dice"] == pytest.approx(0.5)


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="convention"):
        class_scores(FULL, FULL, SPACING, "nnunet")
    with pytest.raises(ValueError, match="one shape"):
        case_scores(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), 2, SPACING, "present")
    with pytest.raises(ValueError, match="spacing"):
        hd95(FULL, FULL, (1.0, 1.0))
