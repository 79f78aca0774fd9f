"""Segmentation losses of the released training recipe (SPEC §5): soft Dice and weighted CE + Dice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -1
DICE_SMOOTH = 1e-5


def _check_pair(logits: Tensor, target: Tensor, num_classes: int) -> None:
    if logits.dim() != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits (B, {num_classes}, H, W), got {tuple(logits.shape)}")
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected an integer target of shape {(logits.shape[0], *logits.shape[2:])}, got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise ValueError(f"expected an integer class-index target, got dtype {target.dtype}")


class DiceLoss(nn.Module):
    """Soft Dice loss as released: 1 - mean over all classes (background included) of the class Dice.

    Class Dice = (2·Σ p·g + smooth) / (Σ p² + Σ g² + smooth), sums over the whole batch and all
    pixels; p = softmax(logits) (computed in float32), g = one-hot target. Pixels labelled
    ``ignore_index`` count for no class. ``logits`` (B, K, H, W), ``target`` (B, H, W) int.
    """

    def __init__(self, num_classes: int, smooth: float = DICE_SMOOTH, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_pair(logits, target, self.num_classes)
        valid = (target != self.ignore_index).unsqueeze(1)
        probs = torch.softmax(logits.float(), dim=1) * valid
        onehot = F.one_hot(target.masked_fill(~valid[:, 0], 0).long(), self.num_classes).permute(0, 3, 1, 2)
        onehot = onehot.to(probs.dtype) * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        denominator = (probs * probs).sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
        return 1 - dice.mean()


class DiceCELoss(nn.Module):
    """``w_ce · CE + w_dice · Dice`` (SPEC §5; 0.5/0.5, Synapse 0.4/0.6), ``ignore_index`` left out of both.

    The cross-entropy is the mean over the non-ignored pixels (0 when every pixel is ignored).
    ``logits`` (B, K, H, W) in any float dtype (the loss is computed in float32), ``target`` (B, H, W) int.
    """

    def __init__(self, num_classes: int, weights: Sequence[float] = (0.5, 0.5), smooth: float = DICE_SMOOTH,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if len(weights) != 2:
            raise ValueError(f"weights must be (w_ce, w_dice), got {weights!r}")
        self.ce_weight, self.dice_weight = (float(w) for w in weights)
        self.ignore_index = ignore_index
        self.dice = DiceLoss(num_classes, smooth, ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        dice = self.dice(logits, target)
        target = target.long()
        ce_sum = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index, reduction="sum")
        ce = ce_sum / (target != self.ignore_index).sum().clamp_min(1)
        return self.ce_weight * ce + self.dice_weight * dice
