#!/usr/bin/env bash
# Session 14, call D (an H200): MLLA-UNet-T's training step at 224², batch 48, bf16 for HEAD_D's fused model in a
# CUDA graph beside the reference, eager and in a graph, all with the fused AdamW.
BASE=7c529cb
LIMIT=${LIMIT:-420}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_D})
step model_ref_${HEAD_D} "$B1 python3 benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph eager eager-graph --out /tmp/res/m"
echo "done after $(($(date +%s) - T0)) s"
