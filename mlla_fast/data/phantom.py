"""A built-in synthetic dataset: small CT-like abdominal volumes with labelled organ-like structures.

Each case is a 3-D volume in Hounsfield-like units: air (-1000) around a body ellipse with a fat
rim (about -100) over soft tissue (about 35), an unlabelled vertebra (bone, about 500), and five
labelled structures: ``liver`` (right upper abdomen), ``kidney_left`` and ``kidney_right``
(posterior), ``spleen`` (left upper) and ``aorta`` (a tube in front of the spine through every
slice), with contrast-enhanced-like intensities (about 100, 125, 170 and 215 HU for liver, spleen,
kidneys and aorta). Shapes are lobed ellipsoids whose size, position, in-plane rotation, lobes,
intensity and the noise level vary per case; every case contains every class.

The files are written in the generic (nnU-Net / MSD) layout, so they go through the same reader
as any user dataset::

    OUT/dataset.json
    OUT/imagesTr/phantom_000_0000.nii.gz   OUT/labelsTr/phantom_000.nii.gz
    OUT/imagesTs/phantom_009_0000.nii.gz   OUT/labelsTs/phantom_009.nii.gz

Images are int16 HU, labels uint8, stored in LPS order (the usual DICOM-derived orientation, so
preparing them exercises the reorientation to RAS) with a per-case spacing of 3-4.2 mm in-plane
and 4-6 mm between slices. Everything is a function of the seed: the same seed writes the same
arrays.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

PHANTOM_CLASSES = ("background", "liver", "kidney_left", "kidney_right", "spleen", "aorta")
PHANTOM_WINDOW = (-150.0, 250.0)
DEFAULT_CASES = 12
DEFAULT_SIZE = (96, 24)


def _lobed_ellipsoid(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray], center, radii, angle: float, lobes: int, depth: float, phase: float
) -> np.ndarray:
    """Boolean mask of an ellipsoid rotated in-plane by ``angle`` whose outline has ``lobes`` bumps."""
    x, y, z = grid
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / radii[0], (-s * dx + c * dy) / radii[1]
    w = dz / radii[2]
    outline = 1.0 + depth * np.sin(lobes * np.arctan2(v, u) + phase)
    return u**2 + v**2 + w**2 <= outline**2


def phantom_case(rng: np.random.Generator, size_xy: int, size_z: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case as (image int16 HU, label uint8), both (X, Y, Z) in RAS order.

    X runs from the patient's left to right, Y posterior to anterior, Z inferior to superior.
    Label values index ``PHANTOM_CLASSES``.
    """
    coords = np.linspace(-1.0, 1.0, size_xy)
    grid = np.meshgrid(coords, coords, np.linspace(0.0, 1.0, size_z), indexing="ij")
    x, y, _z = grid

    def jitter(scale: float, n: int = 1) -> np.ndarray:
        return rng.uniform(-scale, scale, size=n)

    image = np.full(grid[0].shape, -1000.0)
    label = np.zeros(grid[0].shape, dtype=np.uint8)

    body_a, body_b = 0.86 + jitter(0.06)[0], 0.64 + jitter(0.06)[0]
    body_cx, body_cy = jitter(0.04)[0], jitter(0.04)[0]
    body = ((x - body_cx) / body_a) ** 2 + ((y - body_cy) / body_b) ** 2 <= 1.0
    fat_rim = 0.07 + jitter(0.02)[0]
    inner = ((x - body_cx) / (body_a - fat_rim)) ** 2 + ((y - body_cy) / (body_b - fat_rim)) ** 2 <= 1.0
    image[body] = -100.0 + jitter(15)[0]
    image[inner] = 35.0 + jitter(8)[0]
    spine = (x - body_cx) ** 2 + (y - body_cy + 0.42) ** 2 <= (0.1 + jitter(0.015)[0]) ** 2
    image[spine] = 500.0 + jitter(100)[0]

    organs = (  # class index, centre (x, y, z), radii, mean HU
        (1, (0.34, 0.05, 0.66), (0.33, 0.28, 0.36), 100.0),
        (4, (-0.48, -0.08, 0.68), (0.15, 0.2, 0.24), 125.0),
        (2, (-0.3, -0.36, 0.38), (0.1, 0.14, 0.22), 170.0),
        (3, (0.3, -0.36, 0.34), (0.1, 0.14, 0.22), 170.0),
    )
    for index, center, radii, hu in organs:
        mask = (
            _lobed_ellipsoid(
                grid,
                center=np.array(center) + np.array([body_cx, body_cy, 0.0]) + jitter(0.05, 3),
                radii=np.array(radii) * (1.0 + jitter(0.15, 3)),
                angle=jitter(0.35)[0],
                lobes=int(rng.integers(2, 5)),
                depth=rng.uniform(0.0, 0.12),
                phase=rng.uniform(0.0, 2 * np.pi),
            )
            & inner
        )
        image[mask] = hu + jitter(15)[0]
        label[mask] = index
    aorta_x, aorta_y = body_cx - 0.06 + jitter(0.03)[0], body_cy - 0.24 + jitter(0.03)[0]
    aorta_r = 0.055 + jitter(0.012)[0]
    aorta = (x - aorta_x) ** 2 + (y - aorta_y) ** 2 <= aorta_r**2
    image[aorta] = 215.0 + jitter(25)[0]
    label[aorta] = 5

    image += rng.normal(0.0, rng.uniform(8.0, 22.0), size=image.shape)
    return np.clip(np.round(image), -1024, 3071).astype(np.int16), label


def _lps_affine(shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Affine of an array stored in LPS order (first two axes flipped relative to RAS)."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [origin[0] + spacing[0] * (shape[0] - 1), origin[1] + spacing[1] * (shape[1] - 1), origin[2]]
    return affine


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def make_phantom(
    out: str | Path,
    cases: int = DEFAULT_CASES,
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    test_fraction: float = 0.25,
) -> Path:
    """Write the synthetic dataset (generic layout, see the module docstring) to ``out``.

    ``size = (XY, Z)``: in-plane size and number of slices. The last ``round(cases *
    test_fraction)`` cases (at least one when ``cases >= 2``) go to imagesTs/labelsTs. Phantom
    files already in ``out`` are replaced. Returns ``out``.
    """
    size_xy, size_z = (int(n) for n in size)
    if cases < 1 or size_xy < 16 or size_z < 4:
        raise ValueError(f"phantom needs cases >= 1, XY >= 16 and Z >= 4; got cases={cases}, size={tuple(size)}")
    out = Path(out)
    n_test = min(cases - 1, max(1, round(cases * test_fraction))) if cases >= 2 else 0
    folders = {name: out / name for name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        # cases of an earlier, larger phantom in the same folder would otherwise join the test split
        for stale in folder.glob("phantom_*.nii.gz"):
            if re.fullmatch(r"phantom_\d+(_0000)?\.nii\.gz", stale.name):
                stale.unlink()
    training, test = [], []
    for i in range(cases):
        rng = np.random.default_rng([seed, i])
        image, label = phantom_case(rng, size_xy, size_z)
        spacing = (rng.uniform(3.0, 4.2),) * 2 + (rng.uniform(4.0, 6.0),)
        origin = rng.uniform(-200.0, -100.0, size=3)
        affine = _lps_affine(image.shape, spacing, origin)
        case_id = f"phantom_{i:03d}"
        kind = "Ts" if i >= cases - n_test else "Tr"
        # RAS -> LPS storage: flip the first two axes, matching the affine.
        _save(image[::-1, ::-1, :].copy(), affine, folders[f"images{kind}"] / f"{case_id}_0000.nii.gz")
        _save(label[::-1, ::-1, :].copy(), affine, folders[f"labels{kind}"] / f"{case_id}.nii.gz")
        if kind == "Tr":
            training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
        else:
            test.append(f"./imagesTs/{case_id}.nii.gz")
    meta = {
        "name": "phantom",
        "description": f"mlla-fast synthetic CT-like phantom, seed {seed}, size {size_xy}x{size_xy}x{size_z}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(i): name for i, name in enumerate(PHANTOM_CLASSES)},
        "numTraining": len(training),
        "numTest": len(test),
        "file_ending": ".nii.gz",
        "training": training,
        "test": test,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mlla-fast phantom``."""
    parser.add_argument("--out", required=True, type=Path, help="folder to write the dataset to (created)")
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help="number of cases (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=list(DEFAULT_SIZE),
        metavar=("XY", "Z"),
        help="in-plane size and number of slices (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the phantom dataset and say where it went."""
    out = make_phantom(args.out, cases=args.cases, seed=args.seed, size=args.size)
    print(
        f"wrote {args.cases} phantom cases to {out} (prepare with: mlla-fast prepare --dataset phantom "
        f"--data-root {out} --out PREPARED)"
    )
    return 0
