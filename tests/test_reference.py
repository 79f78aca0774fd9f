"""The reference model against the authors' golden tensors, its contract and its input checks."""

from __future__ import annotations

import pytest
import torch

import mlla_fast
from mlla_fast.reference import (
    MODEL_CONFIGS,
    MLLABlock,
    MLLAUNet,
    PatchExpand,
    PatchMerging,
    create_reference_model,
    imagenet_to_unet_state_dict,
    load_imagenet_pretrained,
    rope_table,
)

from golden import golden_module, load_golden
from tolerance import rel_err

CLASSES = {"MLLABlock": MLLABlock, "PatchMerging": PatchMerging, "PatchExpand": PatchExpand, "MLLA_UNet": MLLAUNet}
GOLDEN_FILES = [
    "block_c64_h2_14x14.pt",
    "block_c96_h3_8x8.pt",
    "patch_merging_c64_14x14.pt",
    "patch_expand_c128_7x7.pt",
    "unet_tiny_64px.pt",
]
GOLDEN_RTOL = 1e-8


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_float64(name):
    data = load_golden(name)
    module = golden_module(data, CLASSES).double().eval()
    x = data["x"].double().requires_grad_()
    y = module(x)
    (y * data["grad_out"]).sum().backward()
    assert rel_err(y, data["y"]) <= GOLDEN_RTOL
    assert rel_err(x.grad, data["grad_x"]) <= GOLDEN_RTOL
    params = dict(module.named_parameters())
    assert data["grad_params"], "golden file has no parameter gradients"
    for key, expected in data["grad_params"].items():
        err = rel_err(params[key].grad, expected)
        assert err <= GOLDEN_RTOL, f"{name}: gradient of {key}: relative error {err:.2e}"


def test_golden_rope_table_matches_formula():
    data = load_golden("block_c96_h3_8x8.pt")
    stored = data["state_dict"]["attn.rope.rotations"]
    assert torch.equal(rope_table(8, 8, 96), stored)


def test_rope_at_trained_grid_is_the_buffer_and_elsewhere_computed():
    block = MLLABlock(64, (14, 14), 2)
    assert block.attn.rope.table(14, 14) is block.attn.rope.rotations
    other = block.attn.rope.table(6, 10)
    assert torch.equal(other, MLLABlock(64, (6, 10), 2).attn.rope.rotations)


def test_tiny_parameter_count_and_state_dict_size():
    model = create_reference_model("tiny", num_classes=9)
    assert sum(p.numel() for p in model.parameters()) == 28_505_312
    assert len(model.state_dict()) == 713


def test_block_parameter_count():
    assert sum(p.numel() for p in MLLABlock(64, (8, 8), 2).parameters()) == 13 * 64 * 64 + 54 * 64 == 56_704


def test_strict_loading_between_reference_and_fast_block():
    ref = MLLABlock(96, (8, 8), 3)
    fast = mlla_fast.MLLABlock(96, (8, 8), 3, backend="torch")
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(2, 64, 96)
    torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=0)


def test_strict_loading_unet_golden_into_fast_model():
    data = load_golden("unet_tiny_64px.pt")
    config = {k: v for k, v in data["config"].items() if k not in ("cls", "B")}
    model = mlla_fast.MLLAUNet(**config, backend="torch")
    model.load_state_dict(data["state_dict"], strict=True)
    y = model.double().eval()(data["x"].double())
    assert rel_err(y, data["y"]) <= GOLDEN_RTOL


@pytest.mark.parametrize("config", sorted(MODEL_CONFIGS))
def test_every_config_trains(config):
    model = create_reference_model(config, num_classes=4, img_size=32).train()
    x = torch.randn(2, 3, 32, 64)
    y = model(x)
    assert y.shape == (2, 4, 32, 64)
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{config}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{config}: {name} has a non-finite gradient"
    assert torch.isfinite(y).all()


def test_non_square_one_channel_and_any_class_count():
    model = create_reference_model("tiny", num_classes=2, img_size=64, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 1, 96, 160)
    y = model(x)
    assert y.shape == (1, 2, 96, 160)
    torch.testing.assert_close(y, model(x.expand(-1, 3, -1, -1)))
    single = create_reference_model("tiny", num_classes=13, in_chans=1, img_size=64, depths=(1, 1, 1, 1))
    assert single(torch.randn(2, 1, 64, 32)).shape == (2, 13, 64, 32)


def test_block_on_another_grid_than_constructed():
    block = MLLABlock(64, (14, 14), 2).eval()
    x = torch.randn(1, 6 * 10, 64)
    moved = MLLABlock(64, (6, 10), 2).eval()
    moved.load_state_dict({k: v for k, v in block.state_dict().items() if "rotations" not in k}, strict=False)
    torch.testing.assert_close(block(x, (6, 10)), moved(x))


def _imagenet_checkpoint(model: MLLAUNet) -> dict:
    """An ImageNet MLLA-T checkpoint in the released format: encoder, stem, norm and a classifier head."""
    encoder = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()
               if k.startswith(("patch_embed.", "layers.", "norm."))}
    encoder["head.weight"] = torch.randn(1000, model.num_features)
    encoder["head.bias"] = torch.randn(1000)
    return {"model": encoder}


def test_imagenet_checkpoint_loading(tmp_path):
    model = create_reference_model("tiny", num_classes=9)
    checkpoint = _imagenet_checkpoint(model)
    path = tmp_path / "mlla_t.pth"
    torch.save(checkpoint, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded, missing = load_imagenet_pretrained(model, str(path))
    state = model.state_dict()
    src = checkpoint["model"]
    for key in src:
        if key.startswith("head."):
            assert key not in state
        else:
            assert torch.equal(state[key], src[key]), key
    for i, depth in enumerate(MODEL_CONFIGS["tiny"]["depths_decoder"][1:], start=1):
        for j in range(depth):
            key = f"layers_up.{i}.blocks.{j}.attn.qk.weight"
            assert torch.equal(state[key], src[f"layers.{3 - i}.blocks.{j}.attn.qk.weight"]), key
    for key in ("layers_up.0.conv.0.conv.weight", "concat_back_dim.1.weight", "up.expand.weight", "output.weight"):
        assert torch.equal(state[key], before[key]), key
        assert key in missing
    assert "head.weight" not in loaded


def test_imagenet_mapping_drops_mismatched_rope_tables():
    model = create_reference_model("tiny", num_classes=9, img_size=256)
    mapped = imagenet_to_unet_state_dict(_imagenet_checkpoint(create_reference_model("tiny"))["model"], model)
    assert not any("rotations" in k for k in mapped)
    assert "layers.0.blocks.0.attn.qk.weight" in mapped


def test_imagenet_loading_rejects_other_checkpoints():
    model = create_reference_model("tiny", num_classes=9)
    with pytest.raises(ValueError, match="'model' key"):
        load_imagenet_pretrained(model, {"state_dict": {}})
    with pytest.raises(ValueError, match="matched no encoder"):
        load_imagenet_pretrained(model, {"model": {"foo": torch.zeros(1)}})


class TestBadInput:
    def test_token_count_not_matching_grid(self):
        with pytest.raises(ValueError, match=r"token count 50 does not match the grid 7x7"):
            MLLABlock(64, (7, 7), 2)(torch.randn(1, 50, 64))

    def test_channels_not_multiple_of_32(self):
        with pytest.raises(ValueError, match="multiple of 32, got 48"):
            MLLABlock(48, (7, 7), 2)

    def test_channels_not_matching_module(self):
        with pytest.raises(ValueError, match="expected 64 channels, got 96"):
            MLLABlock(64, (7, 7), 2)(torch.randn(1, 49, 96))

    def test_image_side_not_multiple_of_32(self):
        model = create_reference_model("tiny", num_classes=3, img_size=64, depths=(1, 1, 1, 1))
        with pytest.raises(ValueError, match="multiples of 32, got 64x48"):
            model(torch.randn(1, 3, 64, 48))

    def test_integer_dtype(self):
        with pytest.raises(ValueError, match=r"floating-point.*torch\.int64"):
            MLLABlock(64, (7, 7), 2)(torch.ones(1, 49, 64, dtype=torch.long))
        model = create_reference_model("tiny", num_classes=3, img_size=64, depths=(1, 1, 1, 1))
        with pytest.raises(ValueError, match=r"floating-point image.*torch\.uint8"):
            model(torch.ones(1, 3, 64, 64, dtype=torch.uint8))

    def test_three_d_where_four_d_needed(self):
        model = create_reference_model("tiny", num_classes=3, img_size=64, depths=(1, 1, 1, 1))
        with pytest.raises(ValueError, match=r"4-D image batch .* got \(3, 64, 64\)"):
            model(torch.randn(3, 64, 64))

    def test_four_d_where_tokens_needed(self):
        with pytest.raises(ValueError, match="3-D"):
            MLLABlock(64, (7, 7), 2)(torch.randn(1, 7, 7, 64))

    def test_wrong_channel_count_of_image(self):
        model = create_reference_model("tiny", num_classes=3, img_size=64, depths=(1, 1, 1, 1))
        with pytest.raises(ValueError, match="expected 3 \\(or 1\\) input channels, got 2"):
            model(torch.randn(1, 2, 64, 64))

    def test_unknown_config(self):
        with pytest.raises(ValueError, match="unknown"):
            mlla_fast.create_model("mlla_unet_huge")

    def test_bad_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            mlla_fast.MLLABlock(64, (7, 7), 2, backend="cuda")


@pytest.mark.parametrize("module", [PatchMerging((6, 10), 64), PatchExpand((5, 3), 64)], ids=["edsm", "eusm"])
def test_sampling_gradients_with_a_batch_of_one(module):
    """In eval mode each sample is independent: a batch of one gets the gradient it gets inside a batch."""
    module = module.double().eval()
    with torch.no_grad():
        norm = module.conv[2].norm
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, module.input_resolution[0] * module.input_resolution[1], 64, dtype=torch.float64,
                    requires_grad=True)
    y = module(x)
    g = torch.randn_like(y)
    (grad_pair,) = torch.autograd.grad(y, x, g)
    x1 = x[:1].detach().requires_grad_()
    (grad_one,) = torch.autograd.grad(module(x1), x1, g[:1])
    assert rel_err(grad_one, grad_pair[:1]) <= 1e-12
