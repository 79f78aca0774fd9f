#!/usr/bin/env bash
# Session 8, call 3 (one GPU, steps in order): the flaky test with cuDNN determinism; 512² block profiles; U-Net step; attention op.
# snapshots and the block's scaling on this card, bc93940 beside the session-start 3e7b73c.
BASE=3e7b73c
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16"
step tests_graphs "$T tests/test_graphs.py"
step flaky_x3 "for i in 1 2 3; do $T --tb=line $FLAKY | tail -n 2; done"
step profile512 "python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 30"
step profile512_base "$B0 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 30"
step host512 "python3 benchmarks/profile_block.py --grid 512 --batch 2 --host --rows 30"
step host512_base "$B0 python3 benchmarks/profile_block.py --grid 512 --batch 2 --host --rows 30"
step model "python3 $MODEL --modes train infer --variants fused-graph --out /tmp/res/r"
step model_base "$B0 python3 $MODEL --modes train infer --variants fused-graph"
step determinism "python3 .gpu/determinism.py"
step attention "python3 benchmarks/attention.py --out /tmp/res/r"
echo "done after $(($(date +%s) - T0)) s"
