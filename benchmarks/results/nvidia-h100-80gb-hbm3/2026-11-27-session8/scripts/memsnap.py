"""GPU memory at the peak of one training step, attributed to the source lines that allocated it.

    python memsnap.py unet    # MLLA-UNet-T, 224², batch 48, bf16 autocast, AdamW
    python memsnap.py 512     # one block, C=64, 2 heads, batch 2, 512², bf16
"""

import collections
import sys

import torch
import torch.nn.functional as F

import mlla_fast

OURS = ("mlla_fast", "/kernels/", "/reference/", "memsnap")


def build(what: str, dev: torch.device):
    """(step function, unit in bytes: one (B, N, C) bf16 tensor of the first stage or of the block)."""
    if what == "unet":
        model = mlla_fast.create_model("mlla_unet_tiny", num_classes=9, in_chans=1, img_size=224, backend="triton")
        model = model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(48, 1, 224, 224, device=dev)
        y = torch.randint(0, 9, (48, 224, 224), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        return step, 48 * 56 * 56 * 64 * 2
    side = int(what)
    blk = mlla_fast.MLLABlock(64, (side, side), 2, backend="triton").to(dev, torch.bfloat16)
    x = torch.randn(2, side * side, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)

    def step():
        blk(x).backward(g)
        x.grad = None

    return step, 2 * side * side * 64 * 2


def where(frames: list[dict]) -> str:
    """The innermost two of our own frames (file:line function) of an allocation's stack."""
    keep = [f for f in frames if any(k in f["filename"] for k in OURS)]
    if not keep:
        keep = frames[:1] or [{"filename": "?", "line": 0, "name": "?"}]
    return " < ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in keep[:2])


def main() -> None:
    what = sys.argv[1]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    step, unit = build(what, dev)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_total = torch.cuda.max_memory_allocated() / 2**30
    print(f"{what}: allocated before the step {base / 2**30:.3f} GiB, peak during it {peak_total:.3f} GiB; "
          f"unit = {unit / 2**20:.1f} MiB")
    trace = snap["device_traces"][dev.index or 0]
    live, level, peak, peak_live, i_peak = {}, 0, 0, {}, 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            level += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            level -= live.pop(e["addr"])[0]
        if level > peak:
            peak, peak_live, i_peak = level, dict(live), i
    print(f"peak above the start: {peak / 2**30:.3f} GiB = {peak / unit:.2f} units, at event {i_peak} of "
          f"{len(trace)} ({where(trace[i_peak].get('frames', []))})")
    groups = collections.Counter()
    for size, frames in peak_live.values():
        groups[where(frames)] += size
    for k, b in groups.most_common(45):
        print(f"  {b / 2**20:9.1f} MiB {b / unit:7.2f} u  {k}")


if __name__ == "__main__":
    main()
