#!/usr/bin/env bash
# One GPU session's measurements, most important first, each step under its own time limit, so that a
# session cut short keeps what it finished: the compiled kernel tests, the scaling run (the README's
# plot), the attention op, the block at B=2 (bf16 with torch.compile, fp32), the U-Net training step
# with and without CUDA graphs, and a per-kernel profile. Results and logs go to OUT/<card slug>/.
#
# Usage: scripts/gpu_results.sh OUT [SECONDS [STEP...]]
#   OUT      results root (e.g. benchmarks/results, or $OUT on a lent GPU machine)
#   SECONDS  the whole run's budget (default 3000); a step that would start with under 30 s left is skipped
#   STEP     run only these steps, in the order below (default: all). Steps: tests_<name> for each
#            tests/test_<name>.py below, scaling_B1, attention, scaling_B2_bf16, scaling_B2_fp32, model,
#            train_speed, model_sizes, micro, profile_unet, profile_host; a GPU lease with a per-call limit runs them over several calls
# Environment: PYTHON (python3), MLLA_FAST_COMMIT (the commit, where the tree has no usable .git).
set -uo pipefail

OUT=${1:?usage: scripts/gpu_results.sh OUT [SECONDS]}
BUDGET=${2:-3000}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CARD=$("$PY" -c "import sys; sys.path.insert(0, '.'); from benchmarks.common import environment, default_device
print(environment(default_device())['card_slug'])") || exit 1
LOGS="$OUT/$CARD"
mkdir -p "$LOGS"
START=$(date +%s)

shift $(($# < 2 ? $# : 2))
WANTED=" $* "

step() {  # step NAME SECONDS COMMAND...: run COMMAND (from the repository root) into LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    [ "$WANTED" = "  " ] || [[ "$WANTED" == *" $name "* ]] || return 0
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left} s of the budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s)"
    tail -n 4 "$LOGS/$name.log"
}

for t in linear_attention_kernel dwconv_kernels sampling_kernels graphs mlp fused_model; do
    step "tests_$t" 400 "$PY" -m pytest -p no:cacheprovider --tb=short -q "tests/test_$t.py"
done
step scaling_B1 600 "$PY" benchmarks/scaling.py --variants fused eager softmax --out "$OUT"
step attention 600 "$PY" benchmarks/attention.py --out "$OUT"
step scaling_B2_bf16 600 "$PY" benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd \
    --variants fused eager compiled --out "$OUT"
step scaling_B2_fp32 300 "$PY" benchmarks/scaling.py --batch 2 --grids 512 1024 --modes fwd+bwd --dtype fp32 \
    --variants fused eager --out "$OUT"
step model 900 "$PY" benchmarks/model.py --models tiny --sizes 224:48 1024:4 --modes train infer --dtypes bf16 \
    --variants fused fused-graph eager eager-graph compiled --compiled-sizes 224 --out "$OUT"
step train_speed 600 env PYTHON="$PY" scripts/train_speed.sh -
step model_sizes 900 "$PY" benchmarks/model.py --models tiny small base --sizes 224:48 512:8 1024:2 \
    --modes train infer --dtypes bf16 fp32 --variants fused eager --out "$OUT"
step micro 600 "$PY" -m pytest -p no:cacheprovider -q benchmarks/micro --benchmark-json="$LOGS/micro.json"
step profile_unet 300 "$PY" benchmarks/profile_block.py --model tiny --image 224 --batch 48
step profile_host 200 "$PY" benchmarks/profile_block.py --model tiny --image 224 --batch 48 --host
echo "== done in $(($(date +%s) - START)) s; results in $LOGS"
