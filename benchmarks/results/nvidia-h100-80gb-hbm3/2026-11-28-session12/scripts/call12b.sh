#!/usr/bin/env bash
# Session 12, call B: HEAD (q and k projected inside the attention kernels: no q/k GEMMs, no q/k tensors) beside
# BASE 6c9582e (call A's head): compiled tests first, GPU time by kernel with register counts, block scaling
# (fused, graph; eager once), memory peak, U-Net-T step, the kernel tests last. HEAD_C: set by the caller.
BASE=6c9582e
LIMIT=${LIMIT:-450}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step tests_attention "$B1 $T tests/test_attention_fn.py"
step prof1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof1024_base "$B0 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step mem1024_head "$B1 python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step prof512_head "$B1 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step tests_fused_model "$B1 $T tests/test_fused_model.py"
step model_head "$B1 python3 $MODEL --out /tmp/res/m"
step tests_la_kernel "$B1 $T tests/test_linear_attention_kernel.py"
echo "done after $(($(date +%s) - T0)) s"
