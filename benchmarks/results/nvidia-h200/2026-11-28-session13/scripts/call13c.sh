#!/usr/bin/env bash
# Session 13, call C (an H200): HEAD_C beside BASE fac3e11 (and MID_C, when set, for the U-Net profile):
# compiled tests of what changed (TESTS: pytest arguments), GPU time by kernel of a MLLA-UNet-T step and of a
# 1024² block step, block scaling (fused, graph, eager), the U-Net-T step, the fused-model tests last.
BASE=fac3e11
LIMIT=${LIMIT:-540}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_C})
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 60"
step profunet_${HEAD_C} "$B1 python3 $UNET"
step profunet_${BASE} "$B0 python3 $UNET"
if [ -n "${MID_C:-}" ]; then
    B2=$(tree ${MID_C})
    step profunet_${MID_C} "$B2 python3 $UNET"
fi
step prof1024_${HEAD_C} "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof1024_${BASE} "$B0 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step scaling_${HEAD_C} "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step model_${HEAD_C} "$B1 python3 $MODEL --out /tmp/res/m"
step model_${BASE} "$B0 python3 $MODEL"
step tests_${HEAD_C} "$B1 $T ${TESTS:-tests/test_sampling_kernels.py -k final_head}"
step tests_fused_model_${HEAD_C} "$B1 $T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
