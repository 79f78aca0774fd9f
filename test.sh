#!/usr/bin/env bash
# Set up, lint, then run the test suite. Without a CUDA device the Triton kernels are tested through
# Triton's interpreter on the CPU (TRITON_INTERPRET=1, set before triton is imported).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export TRITON_INTERPRET=1
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
