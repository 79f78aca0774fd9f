"""The drop-in MLLA block: the released constructor and state-dict names, fused kernels on CUDA."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backend import check_backend, use_fused
from .mlp import chunked_mlp, chunked_mlp_supported, mlp_is_random, triton_mlp, triton_mlp_supported
from .reference.block import MLLABlock as ReferenceMLLABlock
from .reference.block import resolve_grid
from .reference.ops import drop_path_mask


class MLLABlock(ReferenceMLLABlock):
    """MLLA block (SPEC §1) with a choice of backend.

    Same constructor, parameters and buffers as the released ``MLLABlock`` (checkpoints load with
    ``strict=True`` both ways), plus ``backend``: "auto" (fused kernels on CUDA, else the
    reference), "triton" (fused kernels or a ``ValueError``) or "torch" (reference); None reads
    ``MLLA_FAST_BACKEND``.

    forward(x, hw=None): x (B, N, C) tokens on the grid hw (default ``input_resolution``) -> (B, N, C).
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, backend: str | None = None, **kwargs):
        super().__init__(dim, input_resolution, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                         drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer)
        self.backend = check_backend(backend)

    def forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        if use_fused(self.backend, x):
            if self.dim != 32 * self.num_heads:
                if self.backend == "triton":
                    raise ValueError(
                        f"backend='triton' needs 32 channels per head, got dim={self.dim} with {self.num_heads} heads"
                    )
                return super().forward(x, hw)
            return self.fused_forward(x, hw)
        return super().forward(x, hw)

    def fused_forward(self, x: Tensor, hw: tuple[int, int] | None = None) -> Tensor:
        """The block on fused kernels: stencils + norms, gate/value GEMM, fused attention, the MLP on Triton
        (narrow layers) or cuBLAS, recomputed in the backward; the Linear layers' bias gradients are Triton
        column sums."""
        from .attention import gv_linear_attention
        from .kernels.dwconv import cpe_residual_norm
        from .linear import compute_dtype
        from .norm_linear import cpe_norm_linear

        hw = resolve_grid(x, hw, self.input_resolution, self.dim)
        dropping = self.drop_path_prob > 0.0 and self.training
        # x + out_proj(attention) as one GEMM (beta = 1) accumulating in place into the residual stream r, which
        # carries out_proj's bias, added by the stencil kernel that writes it: no separate add, no copy of r, and
        # the bias's gradient is the residual gradient's column sum, taken by the stencil's backward; not where
        # the residual stream's dtype is not the GEMM's. Drop-path's per-sample factor (the reference's mask,
        # drawn as add_drop_path would draw it for the branch's output) scales the attention's output in its
        # output pass and the bias in the stencil's store, so the branch costs no elementwise pass either.
        fold = compute_dtype(x) == x.dtype
        scale = drop_path_scale(x, x.dtype, self.drop_path_prob) if fold and dropping else None
        # the gate and value projections as one GEMM on the normed tokens, which are not kept for the backward
        # (mlla_fast/norm_linear.py)
        r, gv = cpe_norm_linear(
            x, self.cpe1.weight, self.cpe1.bias, self.norm1.weight, self.norm1.bias,
            (self.act_proj.weight, self.in_proj.weight), (self.act_proj.bias, self.in_proj.bias), hw, self.norm1.eps,
            residual_bias=self.out_proj.bias if fold else None,
            residual_scale=scale if self.out_proj.bias is not None else None,
        )
        # the value's depthwise convolution + SiLU, qk = v W_qk + b_qk (recomputed in the backward instead of
        # kept), the attention, the gate's SiLU and out_proj in one Function (mlla_fast/attention.py), whose
        # backward writes the gate's and the value's gradients into the two halves of one d gv, and rewrites
        # the attention's output for out_proj's weight gradient instead of keeping it
        y = gv_linear_attention(gv, self.dwc.weight, self.dwc.bias, self.attn.qk.weight, self.attn.qk.bias,
                                self.attn.lepe.weight, self.attn.lepe.bias, hw, self.num_heads,
                                out_weight=self.out_proj.weight, out_bias=None if fold else self.out_proj.bias,
                                residual=r if fold else None, scale=scale)
        x = y if fold else add_drop_path(r, y, self.drop_path_prob, self.training)
        r, h = cpe_residual_norm(
            x, self.cpe2.weight, self.cpe2.bias, self.norm2.weight, self.norm2.bias, hw, self.norm2.eps
        )
        # The MLP's hidden activations (8C per token) are recomputed in the backward instead of saved; with the
        # LayerNorm inputs and the gate recomputed inside the kernels, the first LayerNorm's output in the
        # stencil's backward, and qk and the attention's gated output in the attention's backward, the block keeps
        # about 7.4C per token for its backward (the reference: 29C), the attention's pre-gate output (C) among
        # it. The Triton MLP (narrow layers; bf16/fp16 on CUDA) never writes the hidden layer to memory and adds
        # the residual in its epilogue, drop-path's per-sample scale included (forward and backward: no
        # elementwise pass over (B, N, C) for it); otherwise the cuBLAS MLP runs over token chunks, so that its
        # 4C-wide transients never exist for all tokens at once.
        if triton_mlp_supported(self.mlp, h):
            scale = drop_path_scale(h, compute_dtype(h), self.drop_path_prob) if dropping else None
            return triton_mlp(self.mlp, h, residual=r, scale=scale)
        if chunked_mlp_supported(self.mlp, h):
            mlp_out = chunked_mlp(self.mlp, h)
        elif torch.is_grad_enabled():
            # The RNG state is stashed for the recompute only when the MLP draws random numbers: reading the
            # CUDA RNG state is host work on every step and, before PyTorch 2.10, an error inside CUDA graph
            # capture (mlla_fast.graphs).
            mlp_out = checkpoint(self.mlp, h, use_reentrant=False, preserve_rng_state=mlp_is_random(self.mlp))
        else:
            mlp_out = self.mlp(h)
        return add_drop_path(r, mlp_out, self.drop_path_prob, self.training)


def drop_path_scale(y: Tensor, dtype: torch.dtype, p: float) -> Tensor:
    """Drop-path's per-sample factor for a branch output of y's shape in dtype: keep / (1 - p) as fp32 (B,),
    0 or 1 / (1 - p), for the fused MLP's epilogue. The mask is ``drop_path_mask``'s one bernoulli_ draw of
    shape (B, 1, ..., 1) in dtype on y's device, as ``add_drop_path`` draws it for that output: the same RNG
    use, so the same mask for the same RNG state."""
    mask = drop_path_mask(y.new_empty((y.shape[0],) + (1,) * (y.dim() - 1), dtype=dtype), p)
    return mask.reshape(-1).float().mul_(1.0 / (1.0 - p))


def add_drop_path(r: Tensor, y: Tensor, p: float, training: bool) -> Tensor:
    """``r + drop_path(y, p, training)`` with the reference's mask (``drop_path_mask``: the same mask for the
    same RNG state) and one multiply-add kernel, ``r + y * keep / (1 - p)`` rounded once, instead of three."""
    if p == 0.0 or not training:
        return r + y
    return torch.addcmul(r, y, drop_path_mask(y, p), value=1.0 / (1.0 - p))
