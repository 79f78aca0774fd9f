#!/usr/bin/env bash
# Session 15, call A (an H200): HEAD ee7f4ec (the attention branch's drop-path folded into the fused kernels, b48d889,
# and the prefetching row walks of the cpe backward and the depthwise parameter gradients) with and without the
# prefetch (kernels.dwconv's CPE_BWD_PREFETCH / PARAM_GRAD_PREFETCH set by variant.py), beside BASE cb3e7cf: GPU time
# by kernel of a MLLA-UNet-T step, the U-Net-T step in a graph, the block at 1024², compiled tests of what changed.
BASE=cb3e7cf
HEAD_A=ee7f4ec
LIMIT=${LIMIT:-575}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_A})
V="python3 $ROOT/.gpu/variant.py"
NOPF="CPE_BWD_PREFETCH=False PARAM_GRAD_PREFETCH=False"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
BLOCK="benchmarks/profile_block.py --grid 1024 --rows 40"
step profunet_${HEAD_A} "$B1 python3 $UNET"
step profunet_${HEAD_A}_nopf "$B1 $V $NOPF -- $UNET"
step model_${HEAD_A} "$B1 python3 $MODEL --out /tmp/res/m"
step model_${HEAD_A}_nopf "$B1 $V $NOPF -- $MODEL"
step model_${BASE} "$B0 python3 $MODEL"
step prof1024_${HEAD_A} "$B1 python3 $BLOCK"
step prof1024_${HEAD_A}_nopf "$B1 $V $NOPF -- $BLOCK"
step profunet_${HEAD_A}_cpe168 "$B1 $V CPE_BWD_MAXNREG=168 -- $UNET"
step tests_${HEAD_A} "$B1 $T tests/test_dwconv_kernels.py tests/test_norm_linear.py tests/test_column_sum.py"
step tests_fused_model_${HEAD_A} "$B1 $T tests/test_fused_model.py"
step tests_attention_${HEAD_A} "$B1 $T tests/test_attention_fn.py -k 'gv or opcheck or residual or bad_inputs'"
echo "done after $(($(date +%s) - T0)) s"
