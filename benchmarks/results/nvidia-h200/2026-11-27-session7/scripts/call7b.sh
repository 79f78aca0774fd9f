#!/usr/bin/env bash
# Session 7, call 2 (4 GPUs): tune the attention kernels; memory snapshots; block GPU/host profiles; graph tests.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit) TORCHINDUCTOR_COMPILE_THREADS=8
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
ROOT=$(pwd)
LIMIT=${LIMIT:-330}
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
        (cd "$ROOT" && CUDA_VISIBLE_DEVICES=$n timeout "$left" bash -c "$cmd") > "$dir/$name.log" 2>&1
        echo "g$n $name: exit $? after $(($(date +%s) - t)) s" >> "$dir/steps.txt"
        tail -n 1 "$dir/steps.txt"
        tar czf "$OUT/g$n.tgz" -C /tmp/res/g$n . 2>/dev/null
    done
}
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
stream 0 "tests_graphs|$T tests/test_graphs.py" &
stream 1 "tune1024|python3 benchmarks/attention.py --tune --no-checks --no-compile --cases 2,1024,1024,64" &
stream 2 "tune_unet|python3 benchmarks/attention.py --tune --no-checks --no-compile --cases 48,56,56,64" \
    "tune512|python3 benchmarks/attention.py --tune --no-checks --no-compile --cases 2,512,512,64" &
stream 3 "memsnap_unet|python3 .gpu/memsnap.py unet" \
    "memsnap_512|python3 .gpu/memsnap.py 512" \
    "profile_512|python3 benchmarks/profile_block.py --grid 512 --batch 2 --rows 30" \
    "host_512|python3 benchmarks/profile_block.py --grid 512 --batch 2 --host" &
wait
echo "all streams done after $(($(date +%s) - T0)) s"
