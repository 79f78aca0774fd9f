"""Which op of the fused U-Net is not bitwise reproducible on this GPU? (session 8 probe for the flaky graph test)

1. the fused head alone (test_graphs' shapes): fwd+bwd 20 times on fixed inputs, eager, then graph replays;
2. its sub-ops one at a time;
3. the test's whole model: gradients of one fwd+bwd from one state, 8 eager runs and 8 graph replays.
Prints every tensor that differs from the first run, with the max abs difference.
"""

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "tests")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

import mlla_fast  # noqa: E402
from mlla_fast.kernels import sampling  # noqa: E402

dev = torch.device("cuda")
REPS = 20


def compare(name, runs):
    first = runs[0]
    bad = []
    for i, r in enumerate(runs[1:], 1):
        for k, (a, b) in enumerate(zip(first, r, strict=False)):
            if a is None:
                continue
            if not torch.equal(a, b):
                bad.append((i, k, (a.double() - b.double()).abs().max().item()))
    print(f"{name}: {'reproducible' if not bad else 'DIFFERS'} over {len(runs)} runs"
          + ("" if not bad else f"; first differences (run, output, max abs): {bad[:6]}"), flush=True)


def graph_runs(fn, reps):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    runs = []
    for _ in range(reps):
        g.replay()
        torch.cuda.synchronize()
        runs.append([None if t is None else t.clone() for t in out])
    return runs


def head_probe(dtype):
    gen = torch.Generator(dev).manual_seed(0)
    B, H, W, C, K = 2, 16, 16, 32, 3
    x = torch.randn(B, H * W, C, device=dev, dtype=dtype, generator=gen).requires_grad_()
    we = (torch.randn(16 * C, C, device=dev, generator=gen) * 0.1).requires_grad_()
    nw = (1 + 0.1 * torch.randn(C, device=dev, generator=gen)).requires_grad_()
    nb = (0.1 * torch.randn(C, device=dev, generator=gen)).requires_grad_()
    wh = (torch.randn(K, C, 1, 1, device=dev, generator=gen) * 0.1).requires_grad_()
    go = torch.randn(B, K, 4 * H, 4 * W, device=dev, dtype=dtype, generator=gen)
    params = [x, we, nw, nb, wh]

    def fn():
        for p in params:
            p.grad = None
        out = sampling.final_head(x, (H, W), we, nw, nb, wh, 1e-5)
        out.backward(go)
        return [out.detach()] + [p.grad for p in params]

    compare(f"head {dtype} eager", [[t.clone() for t in fn()] for _ in range(REPS)])
    eager = [t.clone() for t in fn()]
    replays = graph_runs(fn, REPS)
    compare(f"head {dtype} graph replays", replays)
    compare(f"head {dtype} eager vs replay", [eager, replays[0]])

    # sub-ops
    M = B * 16 * H * W
    g = torch.randn(M, K, device=dev, dtype=dtype, generator=gen)
    z = torch.randn(M, C, device=dev, dtype=dtype, generator=gen)
    dy = torch.randn(B * H * W, 16 * C, device=dev, dtype=dtype, generator=gen)
    xc = x.detach().reshape(-1, C)
    y = F.linear(x.detach(), we.detach().to(dtype))
    ops = {
        "dwh = g.t() @ z": lambda: [g.t() @ z],
        "dz = g @ wh": lambda: [g @ wh.detach().reshape(K, C).to(dtype)],
        "dwe = dy.t() @ xc": lambda: [dy.t() @ xc],
        "dx = dy @ we": lambda: [dy @ we.detach().to(dtype)],
        "expand F.linear": lambda: [F.linear(x.detach(), we.detach().to(dtype))],
        "shuffle+LN fwd": lambda: [torch.ops.mlla_fast.pixel_shuffle4_layernorm_fwd(y, nw.detach(), nb.detach(), H, W,
                                                                                     1e-5, False)],
        "shuffle+LN bwd": lambda: list(torch.ops.mlla_fast.pixel_shuffle4_layernorm_bwd(
            z.view(B, 16 * H * W, C), y, nw.detach(), H, W, 1e-5)),
    }
    for name, op in ops.items():
        compare(f"  {dtype} {name} eager", [[t.clone() for t in op()] for _ in range(REPS)])
        compare(f"  {dtype} {name} replays", graph_runs(op, REPS))


def conv_probe(deterministic: bool):
    """The stem's stride-2 3x3 convolution 16 -> 128 at 32x32 (test_graphs' model): input and weight grads."""
    torch.backends.cudnn.deterministic = deterministic
    gen = torch.Generator(dev).manual_seed(0)
    conv = torch.nn.Conv2d(16, 128, 3, stride=2, padding=1, bias=False).to(dev)
    x = torch.randn(2, 16, 32, 32, device=dev, generator=gen).requires_grad_()
    go = torch.randn(2, 128, 16, 16, device=dev, generator=gen)

    def fn():
        x.grad = conv.weight.grad = None
        conv(x).backward(go)
        return [x.grad, conv.weight.grad]

    compare(f"stem conv3.0 (cudnn.deterministic={deterministic}) eager [dx, dw]",
            [[t.clone() for t in fn()] for _ in range(REPS)])
    torch.backends.cudnn.deterministic = False


def model_probe(head: str, deterministic: bool = False):
    from test_graphs import SMALL_UNET

    torch.backends.cudnn.deterministic = deterministic
    head = f"{head}, cudnn.deterministic={deterministic}"

    torch.manual_seed(0)
    model = mlla_fast.create_model("tiny", num_classes=3, img_size=64, backend="triton", **SMALL_UNET).to(dev)
    if head.startswith("reference"):
        import types

        from mlla_fast.reference.unet import MLLAUNet as Ref

        model.head = types.MethodType(Ref.head, model)
    gen = torch.Generator(dev).manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=gen, device=dev)
    y = torch.randint(0, 3, (2, 64, 64), generator=gen, device=dev)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())

    def fn():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    def report(label, runs):
        first = runs[0]
        diffs = {}
        for r in runs[1:]:
            for k, (a, b) in enumerate(zip(first, r, strict=False)):
                if a is not None and not torch.equal(a, b):
                    d = (a.double() - b.double()).abs().max().item()
                    key = "loss" if k == 0 else names[k - 1]
                    diffs[key] = max(diffs.get(key, 0.0), d)
        print(f"model ({head} head) {label}: {len(diffs)} of {len(first)} tensors differ", flush=True)
        for k, d in list(diffs.items())[-12:]:
            print(f"    {k}: max abs {d:.3e}")

    eager = [[None if t is None else t.clone() for t in fn()] for _ in range(8)]
    report("eager x8", eager)
    replays = graph_runs(fn, 8)
    report("graph replays x8", replays)
    report("eager vs replays", [eager[0], *replays])
    torch.backends.cudnn.deterministic = False


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    conv_probe(False)
    conv_probe(True)
    model_probe("fused", deterministic=True)
    model_probe("reference", deterministic=True)
    model_probe("fused")
