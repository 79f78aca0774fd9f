#!/usr/bin/env bash
# Session 17, call D (an H200): the stencils' row walks of HEAD_D (call B's head) at other programs per SM and
# register caps than its default (5 per SM, capped at 96): GPU time by kernel of a U-Net-T step and of a 1024²
# block step.
HEAD_D=${HEAD_D:?set HEAD_D to the commit of .gpu/tree_HEAD_D.tar}
BASE=$HEAD_D
LIMIT=${LIMIT:-330}
cp .gpu/tree_${HEAD_D}.tar .gpu/base_${BASE}.tar
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_D})
V="python3 $ROOT/.gpu/variant.py"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
BLOCK="benchmarks/profile_block.py --grid 1024 --rows 40"
step profunet_${HEAD_D} "$B1 python3 $UNET"
step prof1024_${HEAD_D} "$B1 python3 $BLOCK"
variant() {  # NAME SETTINGS...
    local name=$1; shift
    step profunet_${HEAD_D}_$name "$B1 $V $* -- $UNET"
    step prof1024_${HEAD_D}_$name "$B1 $V $* -- $BLOCK"
}
variant walk6c80 STENCIL_WALK_PROGRAMS_PER_SM=6 STENCIL_WALK_MAXNREG=80
variant walk4c96 STENCIL_WALK_PROGRAMS_PER_SM=4 STENCIL_WALK_MAXNREG=96
variant walk7c72 STENCIL_WALK_PROGRAMS_PER_SM=7 STENCIL_WALK_MAXNREG=72
variant walk5c88 STENCIL_WALK_PROGRAMS_PER_SM=5 STENCIL_WALK_MAXNREG=88
echo "done after $(($(date +%s) - T0)) s"
