#!/usr/bin/env bash
# Session 15, call C (an H200): HEAD_C 1e4bd7c: the compiled tests call B did not reach, then the block at 512² and
# 1024² (batch 2, bf16, fwd+bwd) in a CUDA graph beside the eager reference, same run.
BASE=cb3e7cf
HEAD_C=1e4bd7c
LIMIT=${LIMIT:-470}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_C})
step tests_fused_model_${HEAD_C} "$B1 $T tests/test_fused_model.py"
step tests_attention_${HEAD_C} "$B1 $T tests/test_attention_fn.py -k 'gv or opcheck or residual or bad_inputs'"
step tests_dwconv_${HEAD_C} "$B1 $T tests/test_dwconv_kernels.py -k 'walk'"
step scaling_${HEAD_C} "$B1 python3 benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --variants fused fused-graph eager --out /tmp/res/r"
echo "done after $(($(date +%s) - T0)) s"
