"""Run a benchmark script with settings of kernels/dwconv.py overridden:
python3 variant.py NAME=VALUE ... -- SCRIPT ARGS (values are Python literals)."""
import ast
import runpy
import sys

import mlla_fast.kernels.dwconv as dwconv

split = sys.argv.index("--")
for item in sys.argv[1:split]:
    name, value = item.split("=", 1)
    if not hasattr(dwconv, name):
        raise SystemExit(f"kernels.dwconv has no {name}")
    setattr(dwconv, name, ast.literal_eval(value))
    print(f"kernels.dwconv.{name} = {value}", flush=True)
sys.argv = sys.argv[split + 1:]
runpy.run_path(sys.argv[0], run_name="__main__")
