#!/usr/bin/env bash
# Session 9, call D (one GPU, steps in order): per-kernel GPU time of the 512² block step at fa1e63e and 3183cb6; the
# compiled fused-model tests at fa1e63e.
LIMIT=290
BASE=3183cb6
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step profile512 "python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 30"
step profile512_base "$B0 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 30"
step tests_fused_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
