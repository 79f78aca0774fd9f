#!/usr/bin/env bash
# Session 10, call A: memory peaks by site (512², 1024²), host profile 512², GPU profile 1024², compiled GELU test.
BASE=89eba8a
source benchmarks/results/nvidia-h100-80gb-hbm3/call_head.sh
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
step mem512 "python3 benchmarks/profile_block.py --grid 512 --batch 2 --memory"
step mem1024 "python3 benchmarks/profile_block.py --grid 1024 --batch 2 --memory"
step host512 "python3 benchmarks/profile_block.py --grid 512 --batch 2 --host --steps 20 --rows 40"
step prof1024 "python3 benchmarks/profile_block.py --grid 1024 --batch 2 --rows 40"
step prof512 "python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 40"
step memunet "python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --memory"
step gelu "$T tests/test_mlp_kernel.py -k gelu"
echo "done after $(($(date +%s) - T0)) s"
