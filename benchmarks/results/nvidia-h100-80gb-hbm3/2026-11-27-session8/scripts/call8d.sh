#!/usr/bin/env bash
# Session 8, call 4 (one GPU, steps in order): c-final tests; block and U-Net timed beside 3e7b73c in one run on one card.
# snapshots and the block's scaling on this card, bc93940 beside the session-start 3e7b73c.
BASE=3e7b73c
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16"
step tests_attention_fn "$T tests/test_attention_fn.py"
step scaling "python3 $SCAL --variants fused --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused"
step model "python3 $MODEL --modes train infer --variants fused-graph eager-graph --out /tmp/res/r"
step model_base "$B0 python3 $MODEL --modes train infer --variants fused-graph"
step scaling_again "python3 $SCAL --variants fused"
step tests_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
