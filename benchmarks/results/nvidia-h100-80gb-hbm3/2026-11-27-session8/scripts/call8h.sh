#!/usr/bin/env bash
# Session 8, call 8 (one GPU): the side-stream fix: graph tests and the leak probe again.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
mkdir -p $OUT
timeout 200 python3 -m pytest -p no:cacheprovider --tb=short -q tests/test_graphs.py 2>&1 | tail -n 15 | tee $OUT/tests_graphs.log
timeout 150 python3 .gpu/graphleak.py 2>&1 | grep -E "^(start|after|fused|eager)" | tee $OUT/graphleak.log
