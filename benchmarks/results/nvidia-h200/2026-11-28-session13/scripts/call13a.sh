#!/usr/bin/env bash
# Session 13, call A (an H200): HEAD_C (af8f47b's code: out_proj accumulated into the residual in place) beside
# BASE 636adf9: compiled attention tests, GPU time by kernel at 1024², block scaling (fused, graph; eager and
# compiled once), memory peak, U-Net-T step and its GPU profile, the attention op benchmark, the fused-model tests.
BASE=636adf9
LIMIT=${LIMIT:-560}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step prof1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof1024_base "$B0 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step mem1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step model_head "$B1 python3 $MODEL --out /tmp/res/m"
step profunet_head "$B1 python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 60"
step tests_attention "$B1 $T tests/test_attention_fn.py"
step attention_op "$B1 python3 benchmarks/attention.py --dtypes bf16 --no-checks --out /tmp/res/a"
step scaling_compiled "$B1 python3 $SCAL --variants compiled"
step tests_fused_model "$B1 $T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
