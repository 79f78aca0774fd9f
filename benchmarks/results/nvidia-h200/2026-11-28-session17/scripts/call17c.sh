#!/usr/bin/env bash
# Session 17, call C (an H200): what call B did not reach for HEAD_C (call B's head): the block at 512² and 1024²
# (batch 2, bf16, fwd+bwd) beside the eager reference in one run, the GPU time by kernel of a U-Net-T step and a
# 1024² block step, and the fused model's compiled tests.
HEAD_C=${HEAD_C:?set HEAD_C to the commit of .gpu/tree_HEAD_C.tar}
BASE=$HEAD_C
LIMIT=${LIMIT:-420}
cp .gpu/tree_${HEAD_C}.tar .gpu/base_${BASE}.tar
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_C})
step scaling_${HEAD_C} "$B1 python3 benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --variants fused fused-graph eager --out /tmp/res/r"
step prof1024_${HEAD_C} "$B1 python3 benchmarks/profile_block.py --grid 1024 --rows 40"
step profunet_${HEAD_C} "$B1 python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
step tests_fused_model_${HEAD_C} "$B1 $T tests/test_fused_model.py -k 'block or drop_path or keeps'"
echo "done after $(($(date +%s) - T0)) s"
