#!/usr/bin/env bash
# The common head of the H100 call scripts of sessions 8 and 9 (2026-11-27-session8/scripts/call8b.sh … call8f.sh,
# 2026-11-27-session9/scripts/call9a.sh, call9c.sh, call9d.sh), as it stood at the top of each when they ran, the
# base commit aside. Sourced with BASE set to that commit: installs the wheels and the checkout, unpacks the base
# tree .gpu/base_${BASE}.tar for "$B0 ..." steps, and defines step NAME CMD (CMD under the time left of LIMIT
# seconds, its output in /tmp/res/NAME.log, everything tarred to $OUT).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1 MLLA_FAST_COMMIT=$(cat .commit)
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader
mkdir -p /tmp/base_${BASE} && tar xf .gpu/base_${BASE}.tar -C /tmp/base_${BASE} && (cd /tmp/base_${BASE} && cp -r kernels reference mlla_fast/)
B0="cd /tmp/base_${BASE} && PYTHONPATH=/tmp/base_${BASE}:/tmp/site2 MLLA_FAST_COMMIT=${BASE}"
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
# Added in session 13 (the scripts above never called it): tree COMMIT unpacks .gpu/tree_COMMIT.tar (a git archive)
# into /tmp/t_COMMIT and prints the prefix that runs a command in it, as $B0 does for the base:
# B1=$(tree X); step name "$B1 python3 ...". T: the compiled tests' pytest command.
tree() {
    mkdir -p /tmp/t_$1 && tar xf .gpu/tree_$1.tar -C /tmp/t_$1 && (cd /tmp/t_$1 && cp -r kernels reference mlla_fast/)
    echo "cd /tmp/t_$1 && PYTHONPATH=/tmp/t_$1:/tmp/site2 MLLA_FAST_COMMIT=$1"
}
T="python3 -m pytest -p no:cacheprovider --tb=short -q"
