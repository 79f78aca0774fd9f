#!/usr/bin/env bash
# Session 7, call 1 (4 GPUs): reduced trig + LePE layout; compiled tests; H100 target figures; base 90f175a beside.
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
stream 0 "tests_la|$T tests/test_linear_attention_kernel.py" \
    "tests_model|$T tests/test_fused_model.py tests/test_graphs.py" &
stream 1 "attention|python3 benchmarks/attention.py --no-checks --out /tmp/res/g1/r" \
    "attention_compute|python3 benchmarks/attention.py --no-checks --no-compile --config trig=compute" \
    "attention_base|$B0 python3 benchmarks/attention.py --no-checks --no-compile" \
    "regs|python3 benchmarks/kernel_registers.py --dtype bf16 fp32 --sass" &
stream 2 "scaling|python3 $SCAL --variants fused eager compiled --out /tmp/res/g2/r" \
    "scaling_base|$B0 python3 $SCAL --variants fused" &
stream 3 "model|python3 $MODEL --modes train infer --variants fused-graph eager-graph compiled --compiled-sizes 224 --out /tmp/res/g3/r" \
    "model_base|$B0 python3 $MODEL --modes train --variants fused-graph" &
wait
echo "all streams done after $(($(date +%s) - T0)) s"
