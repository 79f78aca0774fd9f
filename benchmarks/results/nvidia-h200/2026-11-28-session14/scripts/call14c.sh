#!/usr/bin/env bash
# Session 14, call C (an H200): the CUDA-graph training tests of HEAD_C (fused AdamW in mlla-fast train --cuda-graph),
# then the U-Net-T step of HEAD_C beside TRY_C (HEAD_C with the Triton MLP for C <= 128 instead of 64) and TRY_C's
# GPU time by kernel.
BASE=7c529cb
LIMIT=${LIMIT:-480}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_C})
B2=$(tree ${TRY_C})
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
step tests_graphs_${HEAD_C} "$B1 $T tests/test_graphs.py"
step model_${TRY_C} "$B2 python3 $MODEL --out /tmp/res/m"
step model_${HEAD_C} "$B1 python3 $MODEL"
step profunet_${TRY_C} "$B2 python3 $UNET"
echo "done after $(($(date +%s) - T0)) s"
