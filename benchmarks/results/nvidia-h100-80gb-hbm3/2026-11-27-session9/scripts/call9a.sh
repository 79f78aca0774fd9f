#!/usr/bin/env bash
# Session 9, call A (one GPU, steps in order): compiled attention tests; the attention op tuned at 1024² (5ee2de0: gate
# pass folded into the q-side kernel) beside the session-start 3183cb6.
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
CASES="--cases 2,1024,1024,64 2,512,512,64"
step regs "python3 benchmarks/attention.py --resource-usage default"
step attn_tune "python3 benchmarks/attention.py --tune --no-checks $CASES --out /tmp/res/r"
step attn_base "$B0 python3 benchmarks/attention.py --no-checks --no-compile $CASES"
step tests_attn "$T tests/test_linear_attention_kernel.py tests/test_attention_fn.py"
echo "done after $(($(date +%s) - T0)) s"
