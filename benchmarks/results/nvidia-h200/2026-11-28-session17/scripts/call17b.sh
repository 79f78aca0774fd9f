#!/usr/bin/env bash
# Session 17, call B (an H200): HEAD_B takes call A's winners as defaults (the stencils as prefetching row walks
# at 5 programs per SM capped at 96 registers, the square tiles deleted; the attention's pre-gate output saved for
# the backward's element-wise gate pass). The compiled tests of what changed, then in one run the U-Net-T training
# throughput of HEAD_B and of the base cc763cf, the block at 512² and 1024² beside the eager reference, and the
# GPU time by kernel of both.
BASE=cc763cf
HEAD_B=${HEAD_B:?set HEAD_B to the commit of .gpu/tree_HEAD_B.tar}
LIMIT=${LIMIT:-570}
cp .gpu/tree_${BASE}.tar .gpu/base_${BASE}.tar
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
B1=$(tree ${HEAD_B})
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step tests_dwconv_${HEAD_B} "$B1 timeout 150 $T tests/test_dwconv_kernels.py"
step tests_attention_${HEAD_B} "$B1 timeout 120 $T tests/test_attention_fn.py -k 'gv or opcheck or saved or save_o'"
step model_${HEAD_B} "$B1 python3 $MODEL --out /tmp/res/m"
step model_${BASE} "$B0 python3 $MODEL"
step scaling_${HEAD_B} "$B1 python3 benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --variants fused fused-graph eager --out /tmp/res/r"
step profunet_${HEAD_B} "$B1 python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 70"
step prof1024_${HEAD_B} "$B1 python3 benchmarks/profile_block.py --grid 1024 --rows 40"
step tests_fused_model_${HEAD_B} "$B1 $T tests/test_fused_model.py -k 'block or drop_path or keeps'"
echo "done after $(($(date +%s) - T0)) s"
