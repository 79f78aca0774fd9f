"""Run a benchmark script with module settings overridden:
python3 variant.py SETTING=VALUE ... -- SCRIPT ARGS (values are Python literals). SETTING is a name in
mlla_fast.kernels.dwconv (NAME), in another module (mlla_fast.attention:NAME), or a field of the linear
attention's launch configuration (CONFIG.field)."""
import ast
import dataclasses
import importlib
import runpy
import sys

split = sys.argv.index("--")
for item in sys.argv[1:split]:
    name, value = item.split("=", 1)
    value = ast.literal_eval(value)
    if name.startswith("CONFIG."):
        la = importlib.import_module("mlla_fast.kernels.linear_attention")
        la.CONFIG = dataclasses.replace(la.CONFIG, **{name[len("CONFIG."):]: value})
    else:
        module_name, _, attr = name.rpartition(":")
        module = importlib.import_module(module_name or "mlla_fast.kernels.dwconv")
        if not hasattr(module, attr):
            raise SystemExit(f"{module.__name__} has no {attr}")
        setattr(module, attr, value)
    print(f"{name} = {value!r}", flush=True)
sys.argv = sys.argv[split + 1:]
runpy.run_path(sys.argv[0], run_name="__main__")
