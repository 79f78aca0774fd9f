#!/usr/bin/env bash
# Session 10, call B: HEAD (cpe_norm_linear, out_proj inside the attention Function, batch-chunked attention
# backward) beside BASE: memory peaks by site, block scaling 512²/1024² (fused, graph, eager), GPU time by
# kernel at 512², U-Net-T 224² batch 48 training step; then the block under torch.compile.
BASE=89eba8a
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step mem512_head "python3 benchmarks/profile_block.py --grid 512 --batch 2 --memory"
step mem1024_head "python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step prof512_head "python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step prof512_base "$B0 python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head "python3 $SCAL --variants fused fused-graph eager --out /tmp/res/r"
step model_head "python3 $MODEL --out /tmp/res/m"
step model_base "$B0 python3 $MODEL"
step memunet_head "python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --memory"
step scaling_compiled "python3 $SCAL --variants compiled --out /tmp/res/c"
echo "done after $(($(date +%s) - T0)) s"
