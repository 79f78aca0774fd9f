#!/usr/bin/env bash
# Session 9, call C (one GPU, steps in order): the Triton MLP with the erfc-fit GELU (fa1e63e) beside the session-start
# 3183cb6: MLP kernel tests, MLP timings and launch sweep, U-Net-T step, block scaling.
BASE=3183cb6
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step tests_mlp "$T tests/test_mlp_kernel.py"
step mlp_head "python3 .gpu/mlp_bench9.py --sweep"
step mlp_base "$B0 python3 $ROOT/.gpu/mlp_bench9.py"
step model_head "python3 $MODEL --out /tmp/res/r"
step model_base "$B0 python3 $MODEL"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head "python3 $SCAL --variants fused eager compiled fused-graph --out /tmp/res/r"
step tests_fused_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
