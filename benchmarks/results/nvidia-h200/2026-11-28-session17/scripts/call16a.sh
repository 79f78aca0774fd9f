#!/usr/bin/env bash
# Session 16's call A, left for the next session with GPU time (session 16 had none left): in one tree, the
# candidates that are off by default against the defaults, by GPU time per kernel of a U-Net-T step and of a 1024²
# block step, after the compiled tests of the kernels they touch:
# - STENCIL_WALK (kernels/dwconv.py): the forward and transposed stencils as prefetching row walks, at several
#   programs per SM, register caps and without the prefetch;
# - SAVE_ATTENTION_OUTPUT (mlla_fast/attention.py): the gate pass element-wise from the saved pre-gate output;
# - register caps of the output pass and the q-side backward (CONFIG.fwd_out_maxnreg, CONFIG.bwd_q_maxnreg).
HEAD_A=${HEAD_A:?set HEAD_A to the commit of .gpu/tree_HEAD_A.tar}
BASE=$HEAD_A
LIMIT=${LIMIT:-570}
cp .gpu/tree_${HEAD_A}.tar .gpu/base_${BASE}.tar
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_A})
V="python3 $ROOT/.gpu/variant.py"
UNET="benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
BLOCK="benchmarks/profile_block.py --grid 1024 --rows 40"
step tests_${HEAD_A} "$B1 $T tests/test_dwconv_kernels.py tests/test_attention_fn.py -k 'walk or tiles or save_o or opcheck'"
step profunet_${HEAD_A} "$B1 python3 $UNET"
step prof1024_${HEAD_A} "$B1 python3 $BLOCK"
variant() {  # NAME SETTINGS...
    local name=$1; shift
    step profunet_${HEAD_A}_$name "$B1 $V $* -- $UNET"
    step prof1024_${HEAD_A}_$name "$B1 $V $* -- $BLOCK"
}
variant save_o mlla_fast.attention:SAVE_ATTENTION_OUTPUT=True
variant walk4 STENCIL_WALK=True
variant walk3 STENCIL_WALK=True STENCIL_WALK_PROGRAMS_PER_SM=3
variant walk5c96 STENCIL_WALK=True STENCIL_WALK_PROGRAMS_PER_SM=5 STENCIL_WALK_MAXNREG=96
variant walk8c64 STENCIL_WALK=True STENCIL_WALK_PROGRAMS_PER_SM=8 STENCIL_WALK_MAXNREG=64
variant walk4nopf STENCIL_WALK=True STENCIL_WALK_PREFETCH=False
variant out128 CONFIG.fwd_out_maxnreg=128
variant q168 CONFIG.bwd_q_maxnreg=168
echo "done after $(($(date +%s) - T0)) s"
