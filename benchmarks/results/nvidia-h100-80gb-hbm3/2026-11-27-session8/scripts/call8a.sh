#!/usr/bin/env bash
# Session 8, call 1 (4 GPUs): determinism probe for the flaky graph test; GPU tests of the session-start commit.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
ROOT=$(pwd)
LIMIT=${LIMIT:-500}
T0=$(date +%s)
stream() {
    local n=$1; shift
    local dir=/tmp/res/g$n
    mkdir -p "$dir"
    for spec in "$@"; do
        local name=${spec%%|*} cmd=${spec#*|}
        local left=$((LIMIT - ($(date +%s) - T0)))
        if [ "$left" -lt 20 ]; then echo "g$n $name: skipped" >> "$dir/steps.txt"; continue; fi
        local t=$(date +%s)
        (cd "$ROOT" && CUDA_VISIBLE_DEVICES=$((n % NGPU)) timeout "$left" bash -c "$cmd") > "$dir/$name.log" 2>&1
        echo "g$n $name: exit $? after $(($(date +%s) - t)) s" >> "$dir/steps.txt"
        tail -n 1 "$dir/steps.txt"
        tar czf "$OUT/g$n.tgz" -C /tmp/res/g$n . 2>/dev/null
    done
}
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager[triton]"
stream 0 "determinism|python3 .gpu/determinism.py" &
stream 1 "flaky_x6|for i in 1 2 3 4 5 6; do $T --tb=line $FLAKY | tail -n 2; done" &
stream 2 "tests_attention_fn|$T tests/test_attention_fn.py" \
    "tests_model|$T tests/test_fused_model.py tests/test_mlp.py" &
stream 3 "tests_graphs|$T tests/test_graphs.py" \
    "tests_sampling|$T tests/test_sampling_kernels.py" &
wait
echo "all streams done after $(($(date +%s) - T0)) s"
