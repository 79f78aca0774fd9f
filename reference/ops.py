"""Plain PyTorch reference ops of MLLA-UNet, written for reading, not for speed.

Each op takes token-major tensors ``(B, N, C)`` with ``N = H * W`` laid out row-major over the
grid ``hw = (H, W)``. The fused Triton kernels in ``mlla_fast.kernels`` mirror these functions
argument for argument; the tests compare the two on random inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ROPE_BASE = 10000.0
NORMALISER_EPS = 1e-6


def check_tokens(x: Tensor, hw: tuple[int, int], channels: int | None = None, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating (B, H*W, C) tensor (C == channels if given)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D (B, N, C) token tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    H, W = hw
    if x.shape[1] != H * W:
        raise ValueError(
            f"{name}: token count {x.shape[1]} does not match the grid {H}x{W} (expected {H * W} tokens)"
        )
    if channels is not None and x.shape[2] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[2]}")


def tokens_to_image(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) image view."""
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, hw[0], hw[1])


def image_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) image -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


def rope_frequencies(C: int, device=None) -> Tensor:
    """theta_i = 10000 ** (-i / (C/4)), i = 0 .. C/4 - 1, in float64 (C/4,)."""
    k_max = C // 4
    return 1.0 / (ROPE_BASE ** (torch.arange(k_max, device=device, dtype=torch.float64) / k_max))


def rope_table(H: int, W: int, C: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 2-D RoPE cos/sin table of shape (H, W, C/2, 2), as the released code builds it.

    Pair j < C/4 rotates by ``row * theta_j``, pair j >= C/4 by ``col * theta_(j - C/4)``, with
    ``theta_i = 10000 ** (-i / (C/4))``. Computed in float64 and rounded to ``dtype``: this gives the
    stored tables of the released checkpoints bit for bit.
    """
    if C % 4:
        raise ValueError(f"RoPE needs a channel count divisible by 4, got {C}")
    theta = rope_frequencies(C, device)
    rows, cols = torch.meshgrid(
        torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij"
    )
    angles = torch.cat([rows[..., None] * theta, cols[..., None] * theta], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(dtype)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of tokens x (B, H*W, C) by table (H, W, C/2, 2).

    As in the released code, the features are first rounded to float32 (whatever their dtype) and
    the rotation is computed in the promoted dtype of float32 and the table: float32 normally,
    float64 for a float64 table. Reproducing this rounding is what makes the golden tensors agree
    to 1e-16 in float64.
    """
    B, N, C = x.shape
    dtype = torch.promote_types(torch.float32, table.dtype)
    pairs = x.to(torch.float32).to(dtype).reshape(B, N, C // 2, 2)
    rot = table.to(dtype).reshape(N, C // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = rot[..., 0], rot[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(B, N, C)


def dwconv_tokens_ref(x: Tensor, weight: Tensor, bias: Tensor | None, hw: tuple[int, int]) -> Tensor:
    """Depthwise 3x3 convolution (padding 1) of tokens x (B, H*W, C); weight (C, 1, 3, 3)."""
    C = x.shape[2]
    y = F.conv2d(tokens_to_image(x, hw), weight, bias, padding=1, groups=C)
    return image_to_tokens(y)


def cpe_residual_norm_ref(
    x: Tensor,
    cpe_weight: Tensor,
    cpe_bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    hw: tuple[int, int],
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Conditional positional encoding, residual and LayerNorm: returns (r, LayerNorm(r)), r = x + cpe(x)."""
    r = x + dwconv_tokens_ref(x, cpe_weight, cpe_bias, hw)
    return r, F.layer_norm(r, (r.shape[-1],), norm_weight, norm_bias, eps)


def dwconv_silu_ref(x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int]) -> Tensor:
    """SiLU(depthwise 3x3 conv(x)) on tokens (B, H*W, C)."""
    return F.silu(dwconv_tokens_ref(x, weight, bias, hw))


def linear_attention_ref(
    qk: Tensor,
    v: Tensor,
    g: Tensor | None,
    lepe_weight: Tensor,
    lepe_bias: Tensor,
    hw: tuple[int, int],
    num_heads: int,
    rotations: Tensor | None = None,
    gate_silu: bool = False,
) -> Tensor:
    """MLLA linear attention with LePE and gate: ``(attention(v) + lepe(v)) * g``.

    Args:
        qk: (B, N, 2C) output of the ``qk`` projection of v; q is the first C channels, k the rest.
        v: (B, N, C) the attention input (there is no value projection).
        g: (B, N, C) gate, or None for no gating.
        lepe_weight, lepe_bias: (C, 1, 3, 3) and (C,) depthwise LePE convolution.
        hw: the token grid (H, W), N = H * W.
        num_heads: number of heads h; each head is a contiguous C/h channel slice.
        rotations: optional (H, W, C/2, 2) RoPE table; built for the grid when None.
        gate_silu: g is the gate's pre-activation: the output is multiplied by SiLU(g) (the block's
            ``act_proj`` followed by its SiLU).

    Returns:
        (B, N, C): for each head, ``(RoPE(phi(q)) @ kv) * z + lepe(v)``, times g (or SiLU(g)), where
        phi = ELU + 1, kv = sum_m RoPE(phi(k_m)) v_m^T / N and z = 1 / (phi(q) . mean phi(k) + 1e-6).
    """
    B, N, C = v.shape
    H, W = hw
    d = C // num_heads
    q, k = qk[..., :C], qk[..., C:]
    q = F.elu(q) + 1.0
    k = F.elu(k) + 1.0
    table = rope_table(H, W, C, device=v.device) if rotations is None else rotations
    q_rope = apply_rope(q, table)
    k_rope = apply_rope(k, table)

    def heads(t: Tensor) -> Tensor:
        return t.reshape(B, N, num_heads, d).transpose(1, 2)

    q, k, q_rope, k_rope, vh = heads(q), heads(k), heads(q_rope), heads(k_rope), heads(v)
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + NORMALISER_EPS)
    scale = N**-0.5
    kv = (k_rope.transpose(-2, -1) * scale) @ (vh.to(k_rope.dtype) * scale)
    out = (q_rope @ kv).to(v.dtype) * z
    out = out.transpose(1, 2).reshape(B, N, C)
    out = out + dwconv_tokens_ref(v, lepe_weight, lepe_bias, hw)
    if g is None:
        return out
    return out * (F.silu(g) if gate_silu else g)


def batch_norm_image(bn: torch.nn.Module, y: Tensor) -> Tensor:
    """bn(y) on a channels-last copy of the (B, C, H, W) image y.

    The same values as bn(y); the channels-last layout matches the gradient that flows back from
    the token view, which PyTorch's CPU BatchNorm backward gets wrong for a batch of one when the
    layouts differ (torch 2.13: ~100% relative error of the input gradient).
    """
    return bn(y.contiguous(memory_format=torch.channels_last))


def patch_merging_ref(
    x: Tensor,
    hw: tuple[int, int],
    expand_weight: Tensor,
    expand_bias: Tensor,
    dw_weight: Tensor,
    dw_bias: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    bn: torch.nn.BatchNorm2d,
) -> Tensor:
    """EDSM: 1x1 conv C->8C + ReLU, DW 3x3 stride-2 conv + ReLU, 1x1 conv 8C->2C + BatchNorm.

    x (B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C).
    """
    y = F.relu(F.conv2d(tokens_to_image(x, hw), expand_weight, expand_bias))
    y = F.relu(F.conv2d(y, dw_weight, dw_bias, stride=2, padding=1, groups=y.shape[1]))
    return image_to_tokens(batch_norm_image(bn, F.conv2d(y, reduce_weight, reduce_bias)))


def patch_expand_ref(
    x: Tensor,
    hw: tuple[int, int],
    expand_weight: Tensor,
    expand_bias: Tensor,
    dwt_weight: Tensor,
    reduce_weight: Tensor,
    reduce_bias: Tensor,
    bn: torch.nn.BatchNorm2d,
    norm_weight: Tensor,
    norm_bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """EUSM: 1x1 conv C->4C + ReLU, DW transposed 3x3 stride-2 conv (no bias), 1x1 conv 4C->C/2 +
    BatchNorm, LayerNorm. x (B, H*W, C) -> (B, 4*H*W, C/2)."""
    y = F.relu(F.conv2d(tokens_to_image(x, hw), expand_weight, expand_bias))
    y = F.conv_transpose2d(y, dwt_weight, None, stride=2, padding=1, output_padding=1, groups=y.shape[1])
    y = image_to_tokens(batch_norm_image(bn, F.conv2d(y, reduce_weight, reduce_bias)))
    return F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)


def dwconv_stride2_relu_ref(x: Tensor, weight: Tensor, bias: Tensor, hw: tuple[int, int],
                            input_relu: bool = False) -> Tensor:
    """ReLU(depthwise 3x3 stride-2 conv (padding 1) of tokens x (B, H*W, C), ReLU'd first when input_relu)
    -> (B, ceil(H/2)*ceil(W/2), C): the EDSM stencil."""
    image = tokens_to_image(x, hw)
    if input_relu:
        image = F.relu(image)
    return image_to_tokens(F.relu(F.conv2d(image, weight, bias, stride=2, padding=1, groups=x.shape[2])))


def dwconv_transpose2x_ref(x: Tensor, weight: Tensor, hw: tuple[int, int], input_relu: bool = False) -> Tensor:
    """Depthwise transposed 3x3 stride-2 conv (padding 1, output padding 1, no bias) of tokens x (B, H*W, C),
    ReLU'd first when input_relu -> (B, 4*H*W, C): the EUSM stencil."""
    image = tokens_to_image(x, hw)
    if input_relu:
        image = F.relu(image)
    y = F.conv_transpose2d(image, weight, None, stride=2, padding=1, output_padding=1, groups=x.shape[2])
    return image_to_tokens(y)


def pixel_shuffle4_layernorm_ref(y: Tensor, hw: tuple[int, int], norm_weight: Tensor, norm_bias: Tensor,
                                 eps: float = 1e-5) -> Tensor:
    """Tokens y (B, H*W, 16C) read as (p1=4, p2=4, c) and placed as 4x4 patches of the (4H, 4W) grid, then
    LayerNorm(C): (B, 16*H*W, C)."""
    B, _, C16 = y.shape
    H, W = hw
    C = C16 // 16
    y = y.reshape(B, H, W, 4, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(B, 16 * H * W, C)
    return F.layer_norm(y, (C,), norm_weight, norm_bias, eps)


def final_expand_ref(
    x: Tensor, hw: tuple[int, int], expand_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """Final x4 expand: Linear C -> 16C (no bias), then the 4x4 patch placement and LayerNorm(C).
    x (B, H*W, C) -> (B, 16*H*W, C), row-major over (4H, 4W)."""
    return pixel_shuffle4_layernorm_ref(F.linear(x, expand_weight), hw, norm_weight, norm_bias, eps)


def final_head_ref(
    x: Tensor, hw: tuple[int, int], expand_weight: Tensor, norm_weight: Tensor, norm_bias: Tensor,
    head_weight: Tensor, eps: float = 1e-5,
) -> Tensor:
    """The U-Net's output head: ``final_expand_ref`` then the 1x1 convolution without bias (head_weight
    (K, C, 1, 1)) on the (4H, 4W) grid. x (B, H*W, C) -> (B, K, 4H, 4W) logits."""
    B, C = x.shape[0], x.shape[2]
    y = final_expand_ref(x, hw, expand_weight, norm_weight, norm_bias, eps)
    return F.conv2d(y.transpose(1, 2).reshape(B, C, 4 * hw[0], 4 * hw[1]), head_weight)


def drop_path_mask(x: Tensor, p: float) -> Tensor:
    """Stochastic depth's per-sample keep mask (B, 1, ..., 1) of x: 1 with probability 1 - p, else 0, in x's
    dtype and on its device (one bernoulli_ draw, so its RNG use is the same wherever it is called)."""
    return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability p and rescale the rest by 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    return x * drop_path_mask(x, p) / (1.0 - p)


def trunc_normal_init(module: torch.nn.Module) -> None:
    """The released initialisation: Linear weights trunc-normal(std 0.02), biases 0; LayerNorm 1/0."""
    if isinstance(module, torch.nn.Linear):
        torch.nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    elif isinstance(module, torch.nn.LayerNorm):
        torch.nn.init.ones_(module.weight)
        torch.nn.init.zeros_(module.bias)
