#!/usr/bin/env bash
# Session 8, call 6 (one GPU): the block, graph variants last (a graph variant leaves memory allocated for the rest of the process: call 5).
# snapshots and the block's scaling on this card, bc93940 beside the session-start 3e7b73c.
BASE=3e7b73c
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16"
step scaling_final "python3 $SCAL --variants fused eager compiled fused-graph eager-graph --out /tmp/res/r"
echo "done after $(($(date +%s) - T0)) s"
