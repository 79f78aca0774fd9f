#!/usr/bin/env bash
# Session 14, call A (an H200): HEAD_A (one low-precision copy of the parameters per forward) beside BASE 7c529cb:
# GPU time by kernel of a MLLA-UNet-T step, the U-Net-T step in a graph, compiled tests (session 13's three fixed
# tests, the LayerNorm / BatchNorm / casts / norm-linear tests), the fused-model tests last.
BASE=7c529cb
LIMIT=${LIMIT:-540}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_A})
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
step profunet_${HEAD_A} "$B1 python3 $UNET"
step profunet_${BASE} "$B0 python3 $UNET"
step model_${HEAD_A} "$B1 python3 $MODEL --out /tmp/res/m"
step model_${BASE} "$B0 python3 $MODEL"
step tests_${HEAD_A} "$B1 $T tests/test_layer_norm.py tests/test_batch_norm_tokens.py tests/test_casts.py tests/test_norm_linear.py"
step tests_fused_model_${HEAD_A} "$B1 $T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
