#!/usr/bin/env bash
# Session 15, call B (an H200): HEAD_B 1e4bd7c (the cpe backward's prefetch capped at 168 registers, the parameter
# gradients' prefetch dropped) beside itself without the prefetch (CPE_BWD_PREFETCH=False, no register cap: the
# kernels of b48d889) and BASE cb3e7cf: the U-Net-T step in a graph, GPU time by kernel of a U-Net-T step (also with
# 4 programs per SM at 128 registers), the block at 1024², and the compiled tests call A did not reach.
BASE=cb3e7cf
HEAD_B=1e4bd7c
LIMIT=${LIMIT:-575}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_B})
V="python3 $ROOT/.gpu/variant.py"
NOPF="CPE_BWD_PREFETCH=False CPE_BWD_MAXNREG=None"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
BLOCK="benchmarks/profile_block.py --grid 1024 --rows 40"
step model_${HEAD_B} "$B1 python3 $MODEL --out /tmp/res/m"
step model_${HEAD_B}_nopf "$B1 $V $NOPF -- $MODEL"
step model_${BASE} "$B0 python3 $MODEL"
step profunet_${HEAD_B} "$B1 python3 $UNET"
step profunet_${HEAD_B}_cpe128x4 "$B1 $V CPE_BWD_MAXNREG=128 CPE_BWD_PROGRAMS_PER_SM=4 -- $UNET"
step prof1024_${HEAD_B} "$B1 python3 $BLOCK"
step prof1024_${HEAD_B}_nopf "$B1 $V $NOPF -- $BLOCK"
step tests_fused_model_${HEAD_B} "$B1 $T tests/test_fused_model.py"
step tests_attention_${HEAD_B} "$B1 $T tests/test_attention_fn.py -k 'gv or opcheck or residual or bad_inputs'"
step tests_dwconv_${HEAD_B} "$B1 $T tests/test_dwconv_kernels.py -k 'walk'"
echo "done after $(($(date +%s) - T0)) s"
