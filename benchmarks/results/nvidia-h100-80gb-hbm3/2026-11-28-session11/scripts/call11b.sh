#!/usr/bin/env bash
# Session 11, call B: HEAD 13e60c4 (call A's 713e90a plus the qk bias sums in the q/k kernels, dq over q, da/a in
# d gv's u half) beside BASE aedb169: GPU time by kernel, memory peaks by site, block scaling (fused, graph; eager
# once), U-Net-T step, compiled tests.
BASE=aedb169
HEAD_C=13e60c4
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step mem512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --memory"
step mem1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step prof1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step model_head "$B1 python3 $MODEL --out /tmp/res/m"
step tests_attention "$B1 $T tests/test_attention_fn.py"
step tests_fused_model "$B1 $T tests/test_fused_model.py"
step tests_la_kernel "$B1 $T -x tests/test_linear_attention_kernel.py"
echo "done after $(($(date +%s) - T0)) s"
