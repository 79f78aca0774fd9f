#!/usr/bin/env bash
# Session 7, call 4: which change makes test_graphed_training_matches_eager[triton] differ; each run twice.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
mkdir -p /tmp/b && tar xf .gpu/base_4e30e91.tar -C /tmp/b && (cd /tmp/b && cp -r kernels reference mlla_fast/)
TEST="tests/test_graphs.py::test_graphed_training_matches_eager"
run() { local n=$1 name=$2; shift 2; (CUDA_VISIBLE_DEVICES=$n timeout 200 bash -c "$*") > $OUT/$name.log 2>&1; echo "$name exit $?"; }
PY='import sys, pytest, mlla_fast.model as m, mlla_fast.block as b
from mlla_fast.reference.unet import MLLAUNet as R
from mlla_fast.linear import linear
from mlla_fast.kernels.linear_attention import linear_attention
if sys.argv[1] == "head": m.MLLAUNet.head = R.head
if sys.argv[1] == "qk": b.qk_linear_attention = lambda v, g, w, bias, lw, lb, hw, nh, gate_silu=False: linear_attention(linear(v, w, bias), v, g, lw, lb, hw, nh, gate_silu=gate_silu)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--tb=line", "-x", sys.argv[2], sys.argv[2]]))'
run 0 current "for i in 1 2; do python3 -m pytest -q -p no:cacheprovider --tb=line $TEST; done" &
run 1 base4e30e91 "cd /tmp/b && for i in 1 2; do PYTHONPATH=/tmp/b:/tmp/site2 python3 -m pytest -q -p no:cacheprovider --tb=line $TEST; done" &
run 2 nohead "python3 -c '$PY' head $TEST" &
run 3 noqk "python3 -c '$PY' qk $TEST" &
wait
