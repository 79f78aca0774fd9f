#!/usr/bin/env bash
# Session 8, call 7 (one GPU): what a graph variant leaves allocated.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
mkdir -p $OUT
timeout 300 python3 .gpu/graphleak.py 2>&1 | grep -v Warning | tee $OUT/graphleak.log
