#!/usr/bin/env bash
# Session 12, call A: HEAD 6c9582e (session 11's last commit: the attention backward's do in d gv's u half, never
# run compiled) beside BASE 713e90a (16.70 ms of GPU time per 1024² step in session 11): GPU time by kernel,
# memory peaks, block scaling (fused, graph; eager once), host profile at 512², compiled tests.
BASE=713e90a
HEAD_C=6c9582e
LIMIT=${LIMIT:-560}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
step tests_attention "$B1 $T tests/test_attention_fn.py"
step prof1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof1024_base "$B0 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step mem1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step host512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --host --steps 20"
step tests_fused_model "$B1 $T tests/test_fused_model.py"
step tests_la_kernel "$B1 $T tests/test_linear_attention_kernel.py"
echo "done after $(($(date +%s) - T0)) s"
