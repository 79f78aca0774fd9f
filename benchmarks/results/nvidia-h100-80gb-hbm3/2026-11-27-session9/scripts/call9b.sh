#!/usr/bin/env bash
# Session 9, call B: the attention op's launch configuration tuned on this H100 at 2x1024^2x64 bf16 (1bbc508: the
# session-start kernels), then timed at 1024^2 and 512^2.
set -u
export PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
mkdir -p /tmp/res
timeout 500 python3 benchmarks/attention.py --tune --no-checks --no-compile --cases 2,1024,1024,64 2,512,512,64 --out /tmp/res/r > /tmp/res/attn_tune.log 2>&1
echo "exit $?"
tar czf "$OUT/res.tgz" -C /tmp/res .
