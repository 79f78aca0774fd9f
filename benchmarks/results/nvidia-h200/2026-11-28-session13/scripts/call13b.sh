#!/usr/bin/env bash
# Session 13, call B (an H200): HEAD_C (the row-walk, column-sum and partials-reduction loops software-pipelined
# with tl.range(num_stages=...)) beside BASE fac3e11: compiled stencil and column-sum tests, GPU time by kernel
# at 1024² and for MLLA-UNet-T with the pipelining depth 1 (off), 2, 3, 4 (.gpu/stages.py), block scaling
# (fused, graph) and the U-Net-T step for both commits.
BASE=fac3e11
LIMIT=${LIMIT:-560}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
mkdir -p /tmp/head_${HEAD_C} && tar xf .gpu/head_${HEAD_C}.tar -C /tmp/head_${HEAD_C} && (cd /tmp/head_${HEAD_C} && cp -r kernels reference mlla_fast/)
B1="cd /tmp/head_${HEAD_C} && PYTHONPATH=/tmp/head_${HEAD_C}:/tmp/site2 MLLA_FAST_COMMIT=${HEAD_C}"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
S="python3 $ROOT/.gpu/stages.py"
step tests_dwconv "$B1 $T tests/test_dwconv_kernels.py tests/test_column_sum.py"
for st in 1 2 3 4; do
    step prof1024_s$st "$B1 STAGES=$st $S benchmarks/profile_block.py --grid 1024 --batch 2 --rows 30"
done
for st in 1 2 3 4; do
    step profunet_s$st "$B1 STAGES=$st $S benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 40"
done
step scaling_head "$B1 python3 $SCAL --variants fused fused-graph"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step model_head "$B1 python3 $MODEL"
step model_base "$B0 python3 $MODEL"
echo "done after $(($(date +%s) - T0)) s"
