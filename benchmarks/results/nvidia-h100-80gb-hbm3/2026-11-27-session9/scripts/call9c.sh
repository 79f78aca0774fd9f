#!/usr/bin/env bash
# Session 9, call C (one GPU, steps in order): the Triton MLP with the erfc-fit GELU (fa1e63e) beside the session-start
# 3183cb6: MLP kernel tests, MLP timings and launch sweep, U-Net-T step, block scaling.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
mkdir -p /tmp/base_3183cb6 && tar xf .gpu/base_3183cb6.tar -C /tmp/base_3183cb6 && (cd /tmp/base_3183cb6 && cp -r kernels reference mlla_fast/)
B0="cd /tmp/base_3183cb6 && PYTHONPATH=/tmp/base_3183cb6:/tmp/site2 MLLA_FAST_COMMIT=3183cb6"
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
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16 --modes train --variants fused-graph"
step tests_mlp "$T tests/test_mlp_kernel.py"
step mlp_head "python3 .gpu/mlp_bench9.py --sweep"
step mlp_base "$B0 python3 $ROOT/.gpu/mlp_bench9.py"
step model_head "python3 $MODEL --out /tmp/res/r"
step model_base "$B0 python3 $MODEL"
step scaling_base "$B0 python3 $SCAL --variants fused fused-graph"
step scaling_head "python3 $SCAL --variants fused eager compiled fused-graph --out /tmp/res/r"
step tests_fused_model "$T tests/test_fused_model.py"
echo "done after $(($(date +%s) - T0)) s"
