"""Run a benchmark script with the software-pipelining depth of the row-walk and column-sum loops overridden:
STAGES (all four loops), or CPE_STAGES, PG_STAGES, RED_STAGES, CS_STAGES one by one (environment variables).
    STAGES=2 python stages.py benchmarks/profile_block.py --grid 1024 --batch 2
"""
import os
import runpy
import sys

from mlla_fast.kernels import column_sum, dwconv

names = {"CPE_STAGES": (dwconv, "CPE_BWD_STAGES"), "PG_STAGES": (dwconv, "PARAM_GRAD_STAGES"),
         "RED_STAGES": (dwconv, "REDUCE_STAGES"), "CS_STAGES": (column_sum, "COLSUM_STAGES")}
for env, (module, attr) in names.items():
    value = os.environ.get(env, os.environ.get("STAGES"))
    if value:
        setattr(module, attr, int(value))
print("stages:", {attr: getattr(module, attr) for module, attr in names.values()}, flush=True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
