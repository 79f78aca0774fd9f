#!/usr/bin/env bash
# The main job: set up, then make the phantom dataset, prepare it, train, evaluate and report.
# Extra arguments go to `mlla-fast demo` (e.g. --minutes 10 --out runs/demo).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/mlla-fast demo "$@"
