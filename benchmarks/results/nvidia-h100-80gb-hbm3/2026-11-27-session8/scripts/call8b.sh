#!/usr/bin/env bash
# Session 8, call 2 (one GPU, steps in order): bc93940 (q/k split) tested; cudnn determinism probe; block memory
# snapshots and the block's scaling on this card, bc93940 beside the session-start 3e7b73c.
BASE=3e7b73c
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
step tests_attention "$T tests/test_attention_fn.py tests/test_linear_attention_kernel.py"
step memsnap512 "python3 .gpu/memsnap.py 512"
step memsnap512_base "$B0 python3 $ROOT/.gpu/memsnap.py 512"
step scaling "python3 $SCAL --variants fused eager compiled --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused"
step tests_graphs "$T tests/test_graphs.py"
step flaky_x4 "for i in 1 2 3 4; do $T --tb=line $FLAKY | tail -n 2; done"
step determinism "python3 .gpu/determinism.py"
step tests_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
