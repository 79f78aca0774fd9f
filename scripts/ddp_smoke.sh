#!/usr/bin/env bash
# Smoke test of multi-GPU training on one host: phantom -> prepare -> torchrun train (NCCL) -> evaluate,
# then the same run killed (SIGKILL) after its first checkpoint and resumed, compared with the first.
#
# Usage: scripts/ddp_smoke.sh LOG [WORK_DIR]
#   LOG       file that receives everything printed (appended)
#   WORK_DIR  scratch folder (default: a new temporary folder)
# Environment: GPUS (default 2), ITERATIONS (300), BATCH (48), BACKEND (auto), PYTHON (python).
set -euo pipefail

LOG=${1:?usage: scripts/ddp_smoke.sh LOG [WORK_DIR]}
WORK=${2:-$(mktemp -d)}
GPUS=${GPUS:-2}
ITERATIONS=${ITERATIONS:-300}
BATCH=${BATCH:-48}
BACKEND=${BACKEND:-auto}
PY=${PYTHON:-python}
VAL_EVERY=$((ITERATIONS / 3))

exec > >(tee -a "$LOG") 2>&1
echo "== ddp smoke: $(date -u +%FT%TZ), $GPUS GPUs, $ITERATIONS iterations, batch $BATCH, backend $BACKEND, in $WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv || true
"$PY" -m mlla_fast info

"$PY" -m mlla_fast phantom --out "$WORK/phantom"
"$PY" -m mlla_fast prepare --dataset phantom --data-root "$WORK/phantom" --out "$WORK/prepared"

train() {  # train OUT [extra flags]
    local out=$1
    shift
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m mlla_fast train --dataset phantom \
        --data "$WORK/prepared" --out "$out" --iterations "$ITERATIONS" --batch-size "$BATCH" --lr 0.001 \
        --image-size 224 --val-every "$VAL_EVERY" --log-every 10 --workers 4 --device cuda --backend "$BACKEND" "$@"
}

echo "== uninterrupted run"
start=$(date +%s)
train "$WORK/run"
echo "== training took $(( $(date +%s) - start )) s"
tail -n 3 "$WORK/run/train_log.csv"
cat "$WORK/run/val_log.csv"

echo "== evaluate (test split)"
"$PY" -m mlla_fast evaluate --run "$WORK/run" --overlays 4 --save-nifti --convention released
"$PY" -m mlla_fast evaluate --run "$WORK/run" --convention present

echo "== the same run, killed after its first checkpoint, then resumed"
setsid bash -c "$(declare -f train); PY='$PY' WORK='$WORK' ITERATIONS=$ITERATIONS BATCH=$BATCH GPUS=$GPUS \
    VAL_EVERY=$VAL_EVERY BACKEND='$BACKEND' train '$WORK/killed'" &
group=$!
while [ ! -f "$WORK/killed/last.pt" ]; do
    if ! kill -0 "$group" 2>/dev/null; then echo "the run to kill ended early"; exit 1; fi
    sleep 1
done
sleep 5
kill -KILL -- "-$group" || true
wait "$group" || true
echo "killed; last.pt is at iteration $("$PY" -c "import torch,sys; print(torch.load(sys.argv[1], weights_only=True)['iteration'])" "$WORK/killed/last.pt")"
train "$WORK/killed" --resume

"$PY" - "$WORK/run/last.pt" "$WORK/killed/last.pt" <<'PYEOF'
import sys
import torch
a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in sys.argv[1:3])
diffs = {k: (a["model"][k].float() - b["model"][k].float()).abs().max().item()
         for k in a["model"] if a["model"][k].is_floating_point()}
worst = max(diffs, key=diffs.get)
equal = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
print(f"resumed vs uninterrupted: iterations {a['iteration']} / {b['iteration']}, bitwise equal: {equal}, "
      f"max |diff| {diffs[worst]:.3g} ({worst}); best val Dice {a['best_dice']:.4f} / {b['best_dice']:.4f}")
PYEOF
echo "== ddp smoke done: $(date -u +%FT%TZ)"
