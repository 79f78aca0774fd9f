#!/usr/bin/env bash
# Session 11, call C: HEAD 8174315 (call A's 713e90a plus da/a in d gv's u half and dq over q; the qk bias by column
# sums as before) beside BASE aedb169: GPU time by kernel, memory peaks, block scaling (fused, graph; eager once),
# compiled tests. LIMIT: what the device budget leaves.
BASE=aedb169
HEAD_C=8174315
LIMIT=270
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
step prof1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step mem1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step tests_attention "$B1 $T tests/test_attention_fn.py"
step prof512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step mem512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --memory"
step tests_fused_model "$B1 $T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
