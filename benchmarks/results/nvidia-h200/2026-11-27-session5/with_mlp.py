"""Run a benchmark script with the block's Triton MLP width limit set: with_mlp.py LIMIT script.py args..."""
import runpy
import sys

import mlla_fast.mlp

mlla_fast.mlp.TRITON_MLP_MAX_CHANNELS = int(sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
