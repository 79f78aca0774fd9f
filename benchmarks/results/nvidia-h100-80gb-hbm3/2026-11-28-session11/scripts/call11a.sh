#!/usr/bin/env bash
# Session 11, call A: HEAD 713e90a (gv_linear_attention, residual added by out_proj's GEMM) beside BASE aedb169:
# GPU time by kernel, block scaling (fused, graph; eager once), memory, U-Net-T step, compiled tests.
BASE=aedb169
HEAD_C=713e90a
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step prof1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof1024_base "$B0 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step mem512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --memory"
step model_head "$B1 python3 $MODEL --out /tmp/res/m"
step tests_attention "$B1 $T tests/test_attention_fn.py -k 'gv or residual or out_proj or opcheck or matches'"
step tests_norm_linear "$B1 $T tests/test_norm_linear.py"
step tests_fused_model "$B1 $T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
