#!/usr/bin/env bash
# Session 9, call A (one GPU, steps in order): compiled attention tests; the attention op tuned at 1024² (5ee2de0: gate
# pass folded into the q-side kernel) beside the session-start 3183cb6.
BASE=3183cb6
source "$(dirname "$0")/../../call_head.sh"
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
CASES="--cases 2,1024,1024,64 2,512,512,64"
step regs "python3 benchmarks/attention.py --resource-usage default"
step attn_tune "python3 benchmarks/attention.py --tune --no-checks $CASES --out /tmp/res/r"
step attn_base "$B0 python3 benchmarks/attention.py --no-checks --no-compile $CASES"
step tests_attn "$T tests/test_linear_attention_kernel.py tests/test_attention_fn.py"
echo "done after $(($(date +%s) - T0)) s"
