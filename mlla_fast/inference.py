"""Slice-by-slice prediction of whole volumes (SPEC §5), shared by validation, evaluation and prediction.

Every axial slice ``image[:, :, z]`` is resized to the model's input size with the training
resize (cubic, :func:`mlla_fast.data.resize_slice`), the slices are run through the model in
batches, the argmax labels are resized back with nearest neighbour, and stacked to (X, Y, Z).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .data import resize_slice


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing (float32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and give it back in the mode it had (train, usually)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predict_volume(model: nn.Module, image: np.ndarray, image_size: int, device: torch.device,
                   batch_size: int = 16) -> np.ndarray:
    """Label map uint8 (X, Y, Z) of a preprocessed float volume (X, Y, Z), predicted axial slice by slice.

    The model runs in eval mode under ``torch.no_grad`` (bf16 autocast on CUDA) and is returned
    to its previous mode.
    """
    if image.ndim != 3:
        raise ValueError(f"expected a volume (X, Y, Z), got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = (int(image_size), int(image_size))
    in_plane = image.shape[:2]
    out = np.empty(image.shape, dtype=np.uint8)
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, image.shape[2], batch_size):
            zs = range(start, min(start + batch_size, image.shape[2]))
            batch = np.stack([resize_slice(np.asarray(image[:, :, z], dtype=np.float32), size, order=3) for z in zs])
            x = torch.from_numpy(batch[:, None]).to(device)
            with autocast(device):
                labels = model(x).argmax(dim=1).to(torch.uint8).cpu().numpy()
            for i, z in enumerate(zs):
                out[:, :, z] = resize_slice(labels[i], in_plane, order=0)
    return out
