"""What stays allocated after a CUDA-graph variant of scaling.py is done? (session 8 probe)"""
import gc
import sys

import torch

sys.path.insert(0, ".")
from benchmarks import scaling
from benchmarks.common import TimingConfig, measure

dev = torch.device("cuda")
MiB = 2**20
ARGS = scaling.parse_args(["--batch", "2", "--grids", "512", "--modes", "fwd+bwd", "--dtype", "bf16"])
WEIGHTS = scaling.block_weights(ARGS.dim, ARGS.heads, ARGS.seed)
TIMING = TimingConfig(target_s=0.2, max_repeats=5)


def report(label: str) -> None:
    gc.collect()
    torch.cuda.synchronize()
    print(f"{label}: allocated {torch.cuda.memory_allocated() / MiB:.1f} MiB", flush=True)
    snap = torch.cuda.memory._snapshot()
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated" and blk["size"] >= MiB:
                frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in blk.get("frames", [])
                          if "torch/" not in f["filename"] or "graphs" in f["filename"]][:5]
                print(f"    {blk['size'] / MiB:.1f} MiB (pool {seg.get('segment_pool_id')}) < {' < '.join(frames)}")


def run(variant: str) -> None:
    built = {}
    m = measure(lambda: scaling.build_point(variant, "fwd+bwd", (512, 512), ARGS, WEIGHTS, dev, built), dev, TIMING)
    print(f"{variant}: {m.median_ms} ms, peak {m.peak_bytes / 2**30:.3f} GiB", flush=True)


torch.cuda.memory._record_memory_history(max_entries=100000)
report("start")
for variant in ("fused", "fused-graph", "fused", "eager-graph", "fused"):
    run(variant)
    report(f"after {variant}")
