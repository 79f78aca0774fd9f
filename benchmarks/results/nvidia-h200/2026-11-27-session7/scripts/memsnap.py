"""GPU memory at the peak of one training step, attributed to the source lines that allocated it."""
import collections, sys
import torch, torch.nn.functional as F
import mlla_fast

what = sys.argv[1]
dev = torch.device("cuda")
torch.manual_seed(0)
if what == "unet":
    model = mlla_fast.create_model("mlla_unet_tiny", num_classes=9, in_chans=1, img_size=224, backend="triton").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(48, 1, 224, 224, device=dev); y = torch.randint(0, 9, (48, 224, 224), device=dev)
    unit = 48 * 56 * 56 * 64 * 2
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward(); opt.step()
else:
    S = int(what)
    blk = mlla_fast.MLLABlock(64, (S, S), 2, backend="triton").to(dev, torch.bfloat16)
    x = torch.randn(2, S * S, 64, device=dev, dtype=torch.bfloat16, requires_grad=True); g = torch.randn_like(x)
    unit = 2 * S * S * 64 * 2
    def step():
        out = blk(x); out.backward(g); x.grad = None
for _ in range(3): step()
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
torch.cuda.memory._record_memory_history(max_entries=200000)
step(); torch.cuda.synchronize()
snap = torch.cuda.memory._snapshot()
torch.cuda.memory._record_memory_history(enabled=None)
print(f"{what}: allocated before the step {base/2**30:.3f} GiB, peak during it {torch.cuda.max_memory_allocated()/2**30:.3f} GiB; unit = {unit/2**20:.1f} MiB")
def where(frames):
    keep = [f for f in frames if ("mlla_fast" in f["filename"] or "/kernels/" in f["filename"] or "/reference/" in f["filename"] or "memsnap" in f["filename"]) ]
    f0 = keep[0] if keep else (frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
    f1 = keep[1] if len(keep) > 1 else None
    s = f"{f0['filename'].split('/')[-1]}:{f0['line']} {f0['name']}"
    if f1: s += f" < {f1['filename'].split('/')[-1]}:{f1['line']} {f1['name']}"
    return s
trace = snap["device_traces"][dev.index or 0]
live, level, peak, peak_live, i_peak = {}, 0, 0, {}, 0
for i, e in enumerate(trace):
    a = e["action"]
    if a == "alloc":
        live[e["addr"]] = (e["size"], e.get("frames", [])); level += e["size"]
    elif a == "free_completed" and e["addr"] in live:
        level -= live.pop(e["addr"])[0]
    if level > peak:
        peak, peak_live, i_peak = level, dict(live), i
print(f"peak above the start: {peak/2**30:.3f} GiB = {peak/unit:.2f} units, at event {i_peak} of {len(trace)} ({where(trace[i_peak].get('frames', []))})")
groups = collections.Counter()
for size, frames in peak_live.values():
    groups[where(frames)] += size
for k, b in groups.most_common(45):
    print(f"  {b/2**20:9.1f} MiB {b/unit:7.2f} u  {k}")
