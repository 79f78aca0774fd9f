#!/usr/bin/env bash
# Session 14, call B (an H200): HEAD_B (the parameter copies, fused AdamW, the stem's BatchNorms + ReLU on Triton,
# the MLP branch's drop-path in the Triton MLP) beside MID_B (copies + fused AdamW) and BASE 7c529cb: GPU time by
# kernel of a MLLA-UNet-T step, the U-Net-T step in a graph for all three, compiled tests of what changed, the
# fused-model tests and the CUDA-graph training tests last.
BASE=7c529cb
LIMIT=${LIMIT:-560}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_B})
B2=$(tree ${MID_B})
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
step profunet_${HEAD_B} "$B1 python3 $UNET"
step model_${HEAD_B} "$B1 python3 $MODEL --out /tmp/res/m"
step model_${MID_B} "$B2 python3 $MODEL"
step model_${BASE} "$B0 python3 $MODEL"
step tests_${HEAD_B} "$B1 $T tests/test_batch_norm_tokens.py tests/test_mlp_kernel.py tests/test_mlp.py tests/test_casts.py"
step tests_fused_model_${HEAD_B} "$B1 $T tests/test_fused_model.py"
step tests_graphs_${HEAD_B} "$B1 $T tests/test_graphs.py"
echo "done after $(($(date +%s) - T0)) s"
