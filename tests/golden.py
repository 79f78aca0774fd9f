"""Locating and loading the golden tensors produced by the authors' released code (../shared/golden)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(os.environ.get("MLLA_FAST_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def load_golden(name: str) -> dict:
    """Load one golden file; skip outside CI when the folder is absent, fail inside CI."""
    path = GOLDEN_DIR / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"golden file {path} is missing (set MLLA_FAST_GOLDEN to the golden folder)")
        pytest.skip(f"golden file {path} not found (set MLLA_FAST_GOLDEN)")
    return torch.load(path, map_location="cpu", weights_only=False)


def golden_module(data: dict, classes: dict):
    """Build the golden file's module from its config with the class named there, load its state strictly."""
    config = dict(data["config"])
    cls = classes[config.pop("cls")]
    config.pop("B")
    module = cls(**config)
    module.load_state_dict(data["state_dict"], strict=True)
    return module
