"""Known-value tests of the training losses (SPEC §5) on hand-made tensors."""

import math

import pytest
import torch

from mlla_fast.losses import DICE_SMOOTH, DiceCELoss, DiceLoss

S = DICE_SMOOTH


def confident_logits(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose softmax is exactly the one-hot target in float32."""
    return torch.nn.functional.one_hot(target.clamp_min(0), num_classes).permute(0, 3, 1, 2).float() * 200.0


def test_dice_perfect_prediction_is_zero_even_with_an_absent_class():
    target = torch.tensor([[[0, 1], [1, 0]]])
    # class 2 is absent from target and prediction: its Dice is smooth/smooth = 1
    assert DiceLoss(3)(confident_logits(target, 3), target).item() == 0.0


def test_dice_uniform_prediction_known_value():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.zeros(1, 2, 2, 2)
    # p = 0.5 everywhere; class 0: inter 2, denom 4*0.25 + 4 = 5; class 1: inter 0, denom 1
    expected = 1 - ((4 + S) / (5 + S) + S / (1 + S)) / 2
    assert DiceLoss(2)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_sums_over_the_whole_batch_not_per_image():
    # image 0 is all class 1, image 1 all class 0; batch-wise both classes are half present
    target = torch.stack([torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)])
    logits = torch.zeros(2, 2, 2, 2)
    expected = 1 - (4 + S) / (2 + 4 + S)  # per class: inter 8*0.5, denom 8*0.25 + 4
    assert DiceLoss(2)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_ignore_index_acts_as_if_the_pixels_were_absent():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    padded_target = torch.cat([target, torch.full((2, 4, 2), -1)], dim=2)
    padded_logits = torch.cat([logits, torch.randn(2, 3, 4, 2) * 50], dim=3)
    for loss in (DiceLoss(3), DiceCELoss(3, (0.4, 0.6))):
        torch.testing.assert_close(loss(padded_logits, padded_target), loss(logits, target))


def test_dice_ce_known_value_and_weights():
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.zeros(1, 2, 2, 2)
    dice = 1 - ((4 + S) / (5 + S) + S / (1 + S)) / 2
    value = DiceCELoss(2, (0.4, 0.6))(logits, target).item()
    assert value == pytest.approx(0.4 * math.log(2) + 0.6 * dice, rel=1e-6)


def test_all_pixels_ignored_gives_zero_not_nan():
    target = torch.full((1, 3, 3), -1)
    loss = DiceCELoss(4)(torch.randn(1, 4, 3, 3, requires_grad=True), target)
    assert loss.item() == 0.0


def test_loss_is_float32_and_differentiable_from_bf16_logits():
    logits = torch.randn(2, 3, 4, 4).to(torch.bfloat16).requires_grad_()
    loss = DiceCELoss(3)(logits, torch.randint(0, 3, (2, 4, 4)))
    loss.backward()
    assert loss.dtype == torch.float32
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("bad_target", [torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 4, 4)])
def test_bad_shapes_and_dtypes_say_what_was_expected(bad_target):
    with pytest.raises(ValueError, match="expected"):
        DiceLoss(2)(torch.zeros(1, 2, 4, 4), bad_target)
