#!/usr/bin/env bash
# Session 14, call E (an H200): one MLLA block (C=64, B=2, bf16) on HEAD_E beside BASE 7c529cb: GPU time by kernel
# of a 1024² step, then HEAD_E's fused and graphed steps at 512² and 1024².
BASE=7c529cb
LIMIT=${LIMIT:-240}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_E})
step prof1024_${HEAD_E} "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof1024_${BASE} "$B0 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step scaling_${HEAD_E} "$B1 python3 benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --variants fused fused-graph --out /tmp/res/r"
echo "done after $(($(date +%s) - T0)) s"
