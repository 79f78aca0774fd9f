#!/usr/bin/env bash
# End-to-end training throughput of `mlla-fast train` (data loading, augmentation, validation and
# checkpoints included) on the built-in phantom, eager against --cuda-graph, each from a fresh run folder.
#
# Usage: scripts/train_speed.sh LOG [WORK_DIR]
#   LOG       file that also receives everything printed (appended); - for the terminal only
#   WORK_DIR  scratch folder (default: a new temporary folder)
# Environment: CONFIG (tiny), ITERATIONS (200), BATCH (48), SIZE (224), WORKERS (8), BACKEND (auto), PYTHON (python).
# The train log's images_per_s column is the throughput of each logging window; the first window holds
# the start-up (Triton compilation, the graph capture) and is left out of the mean printed at the end.
set -euo pipefail

LOG=${1:?usage: scripts/train_speed.sh LOG [WORK_DIR]}
WORK=${2:-$(mktemp -d)}
CONFIG=${CONFIG:-tiny}
ITERATIONS=${ITERATIONS:-200}
BATCH=${BATCH:-48}
SIZE=${SIZE:-224}
WORKERS=${WORKERS:-8}
BACKEND=${BACKEND:-auto}
PY=${PYTHON:-python}

[ "$LOG" = - ] || exec > >(tee -a "$LOG") 2>&1
echo "== train speed: $(date -u +%FT%TZ), $CONFIG, $ITERATIONS iterations, batch $BATCH, ${SIZE}², backend $BACKEND, in $WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -m mlla_fast phantom --out "$WORK/phantom" --size 256 24
"$PY" -m mlla_fast prepare --dataset phantom --data-root "$WORK/phantom" --out "$WORK/prepared"

for mode in eager graph; do
    flags=()
    [ "$mode" = graph ] && flags=(--cuda-graph)
    start=$(date +%s)
    "$PY" -m mlla_fast train --dataset phantom --data "$WORK/prepared" --out "$WORK/$mode" --config "$CONFIG" \
        --iterations "$ITERATIONS" --batch-size "$BATCH" --image-size "$SIZE" --val-every "$ITERATIONS" \
        --log-every 20 --workers "$WORKERS" --device cuda --backend "$BACKEND" "${flags[@]}"
    echo "== $mode: $(( $(date +%s) - start )) s in all"
    "$PY" - "$WORK/$mode/train_log.csv" "$mode" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
speeds = [float(r["images_per_s"]) for r in rows[1:]]
print(f"{sys.argv[2]}: {statistics.mean(speeds):.0f} images/s (mean of {len(speeds)} logging windows after the "
      f"first; min {min(speeds):.0f}, max {max(speeds):.0f}); last loss {float(rows[-1]['loss']):.4f}")
PY
done
