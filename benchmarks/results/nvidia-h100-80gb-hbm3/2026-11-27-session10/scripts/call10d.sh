#!/usr/bin/env bash
# Session 10, call D: HEAD (no batch chunks; a written over da, dk over k) beside BASE: memory peaks by site,
# block scaling (fused, graph; eager once), GPU time by kernel at 512², U-Net-T step, compiled tests.
BASE=89eba8a
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step mem512_head "python3 benchmarks/profile_block.py --grid 512 --batch 2 --memory"
step mem1024_head "python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step prof512_head "python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head "python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step scaling_base2 "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head2 "python3 $SCAL --variants fused fused-graph"
step model_head "python3 $MODEL --out /tmp/res/m"
step tests_attention "$T tests/test_attention_fn.py -k 'out_proj or matches or partial or opcheck'"
step tests_fused_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
