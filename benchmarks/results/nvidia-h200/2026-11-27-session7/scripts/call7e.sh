#!/usr/bin/env bash
# Session 7, call 5: flakiness of test_graphed_training_matches_eager[triton]: 5 runs each of current, head reverted,
# current with CUBLAS_WORKSPACE_CONFIG=:4096:8, current with deterministic algorithms.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
TEST="tests/test_graphs.py::test_graphed_training_matches_eager[triton]"
run() { local n=$1 name=$2; shift 2; (CUDA_VISIBLE_DEVICES=$n timeout 150 bash -c "$*") > $OUT/$name.log 2>&1; echo "$name: $(grep -c passed $OUT/$name.log) of 5 passed"; }
PY='import sys, pytest, mlla_fast.model as m
from mlla_fast.reference.unet import MLLAUNet as R
if sys.argv[1] == "head": m.MLLAUNet.head = R.head
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", sys.argv[2]]))'
L="for i in 1 2 3 4 5; do"
run 0 current "$L python3 -m pytest -q -p no:cacheprovider --tb=no '$TEST'; done" &
run 1 nohead "$L python3 -c '$PY' head '$TEST'; done" &
run 2 cublas_ws "$L CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 -m pytest -q -p no:cacheprovider --tb=no '$TEST'; done" &
run 3 current_b "$L python3 -m pytest -q -p no:cacheprovider --tb=no '$TEST'; done" &
wait
