#!/usr/bin/env bash
# Session 8, call 4 (one GPU, steps in order): c-final tests; block and U-Net timed beside 3e7b73c in one run on one card.
# snapshots and the block's scaling on this card, bc93940 beside the session-start 3e7b73c.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
mkdir -p /tmp/base_3e7b73c && tar xf .gpu/base_3e7b73c.tar -C /tmp/base_3e7b73c && (cd /tmp/base_3e7b73c && cp -r kernels reference mlla_fast/)
B0="cd /tmp/base_3e7b73c && PYTHONPATH=/tmp/base_3e7b73c:/tmp/site2 MLLA_FAST_COMMIT=3e7b73c"
ROOT=$(pwd)
LIMIT=${LIMIT:-570}
T0=$(date +%s)
mkdir -p /tmp/res
step() {
    local name=$1 cmd=$2
    local left=$((LIMIT - ($(date +%s) - T0)))
    if [ "$left" -lt 20 ]; then echo "$name: skipped" >> /tmp/res/steps.txt; return; fi
    local t=$(date +%s)
    (cd "$ROOT" && timeout "$left" bash -c "$cmd") > "/tmp/res/$name.log" 2>&1
    echo "$name: exit $? after $(($(date +%s) - t)) s" >> /tmp/res/steps.txt
    tail -n 1 /tmp/res/steps.txt
    tar czf "$OUT/res.tgz" -C /tmp/res . 2>/dev/null
}
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
FLAKY="tests/test_graphs.py::test_graphed_training_matches_eager"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16"
step tests_attention_fn "$T tests/test_attention_fn.py"
step scaling "python3 $SCAL --variants fused --out /tmp/res/r"
step scaling_base "$B0 python3 $SCAL --variants fused"
step model "python3 $MODEL --modes train infer --variants fused-graph eager-graph --out /tmp/res/r"
step model_base "$B0 python3 $MODEL --modes train infer --variants fused-graph"
step scaling_again "python3 $SCAL --variants fused"
step tests_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
