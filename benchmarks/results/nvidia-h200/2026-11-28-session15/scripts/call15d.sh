#!/usr/bin/env bash
# Session 15, call D (an H200): the depthwise parameter gradients' prefetch (PARAM_GRAD_PREFETCH, off in 197de21) with
# other register caps and programs per SM than call A's (128 registers, 4 per SM): GPU time by kernel of a U-Net-T
# step and of a 1024² block step.
BASE=cb3e7cf
HEAD_D=197de21
LIMIT=${LIMIT:-330}
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_D})
V="python3 $ROOT/.gpu/variant.py"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
BLOCK="benchmarks/profile_block.py --grid 1024 --rows 40"
P3="PARAM_GRAD_PREFETCH=True PARAM_GRAD_MAXNREG=None PARAM_GRAD_PROGRAMS_PER_SM=3"
P3C="PARAM_GRAD_PREFETCH=True PARAM_GRAD_MAXNREG=168 PARAM_GRAD_PROGRAMS_PER_SM=3"
P4="PARAM_GRAD_PREFETCH=True PARAM_GRAD_MAXNREG=None PARAM_GRAD_PROGRAMS_PER_SM=4"
step profunet_${HEAD_D} "$B1 python3 $UNET"
step profunet_${HEAD_D}_pg3 "$B1 $V $P3 -- $UNET"
step profunet_${HEAD_D}_pg3c168 "$B1 $V $P3C -- $UNET"
step profunet_${HEAD_D}_pg4 "$B1 $V $P4 -- $UNET"
step prof1024_${HEAD_D}_pg3 "$B1 $V $P3 -- $BLOCK"
step prof1024_${HEAD_D}_pg4 "$B1 $V $P4 -- $BLOCK"
echo "done after $(($(date +%s) - T0)) s"
