#!/usr/bin/env bash
# Session 7, call 6: is the head's weight-gradient GEMM (9 x C output, long reduction) the non-reproducible op?
# The head's matmul_to replaced by fixed 2048-token bmm partials summed in order; 5 runs on each of 4 GPUs.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site2 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || echo "editable install failed"
TEST="tests/test_graphs.py::test_graphed_training_matches_eager[triton]"
PY='import sys, torch, pytest
import mlla_fast.kernels.sampling as s
def blocked(a, b, dtype, n=2048):
    m = a.shape[1]; pad = (-m) % n
    a2 = torch.nn.functional.pad(a, (0, pad)).view(a.shape[0], -1, n).transpose(0, 1)
    b2 = torch.nn.functional.pad(b, (0, 0, 0, pad)).view(-1, n, b.shape[1])
    return torch.bmm(a2, b2).to(dtype).sum(0)
s.matmul_to = blocked
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", sys.argv[1]]))'
for n in 0 1 2 3; do (CUDA_VISIBLE_DEVICES=$n bash -c "for i in 1 2 3 4 5; do python3 -c '$PY' '$TEST'; done" > $OUT/g$n.log 2>&1; echo "g$n: $(grep -c ' passed' $OUT/g$n.log) of 5 passed") & done
wait
