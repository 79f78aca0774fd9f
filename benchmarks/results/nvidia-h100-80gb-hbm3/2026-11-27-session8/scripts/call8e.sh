#!/usr/bin/env bash
# Session 8, call 5 (one GPU, steps in order): the block with and without CUDA graphs, bf16 and fp32; U-Net profile and compiled reference.
# snapshots and the block's scaling on this card, bc93940 beside the session-start 3e7b73c.
BASE=3e7b73c
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16"
step scaling_graphs "python3 $SCAL --variants fused-graph eager-graph fused eager compiled --out /tmp/res/r"
step scaling_fp32 "python3 $SCAL --dtype fp32 --variants fused eager fused-graph eager-graph --out /tmp/res/r"
step profile_unet "python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 40"
step model_compiled "python3 $MODEL --modes train --variants compiled --compiled-sizes 224 --out /tmp/res/rc"
echo "done after $(($(date +%s) - T0)) s"
