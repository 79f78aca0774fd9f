#!/usr/bin/env bash
# Session 7, call 3 (4 GPUs): final commit tested and timed; the session-start commit 90f175a beside it.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit) TORCHINDUCTOR_COMPILE_THREADS=8
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
ROOT=$(pwd)
LIMIT=${LIMIT:-540}
T0=$(date +%s)
for b in 90f175a; do mkdir -p /tmp/base_$b && tar xf .gpu/base_$b.tar -C /tmp/base_$b && (cd /tmp/base_$b && cp -r kernels reference mlla_fast/); done
B0="cd /tmp/base_90f175a && PYTHONPATH=/tmp/base_90f175a:/tmp/site2 MLLA_FAST_COMMIT=90f175a"
stream() {
    local n=$1; shift
    local dir=/tmp/res/g$n
    mkdir -p "$dir"
    for spec in "$@"; do
        local name=${spec%%|*} cmd=${spec#*|}
        local left=$((LIMIT - ($(date +%s) - T0)))
        if [ "$left" -lt 20 ]; then echo "g$n $name: skipped" >> "$dir/steps.txt"; continue; fi
        local t=$(date +%s)
        (cd "$ROOT" && CUDA_VISIBLE_DEVICES=$n timeout "$left" bash -c "$cmd") > "$dir/$name.log" 2>&1
        echo "g$n $name: exit $? after $(($(date +%s) - t)) s" >> "$dir/steps.txt"
        tail -n 1 "$dir/steps.txt"
        tar czf "$OUT/g$n.tgz" -C /tmp/res/g$n . 2>/dev/null
    done
}
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
MODEL="benchmarks/model.py --models tiny --sizes 224:48 --dtypes bf16"
SCAL="benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd"
stream 0 "model|python3 $MODEL --modes train infer --variants fused-graph eager-graph compiled --compiled-sizes 224 --out /tmp/res/g0/r" \
    "model_base|$B0 python3 $MODEL --modes train infer --variants fused-graph" &
stream 1 "scaling|python3 $SCAL --variants fused eager compiled --out /tmp/res/g1/r" \
    "attention|python3 benchmarks/attention.py --out /tmp/res/g1/r" \
    "scaling_base|$B0 python3 $SCAL --variants fused" \
    "memsnap_unet|python3 .gpu/memsnap.py unet" \
    "memsnap_512|python3 .gpu/memsnap.py 512" \
    "profile_unet|python3 benchmarks/profile_block.py --model tiny --image 224 --batch 48 --rows 40" &
stream 2 "tests_la|$T tests/test_linear_attention_kernel.py" \
    "tests_graphs|$T tests/test_graphs.py" &
stream 3 "tests_sampling|$T tests/test_sampling_kernels.py" \
    "tests_model|$T tests/test_fused_model.py tests/test_mlp.py" &
wait
echo "all streams done after $(($(date +%s) - T0)) s"
