"""mlla_fast.graphs: GraphedStep's error paths and preserved_training_state everywhere; on CUDA, graphed
training against eager, and ``mlla-fast train --cuda-graph`` (same first step as eager, exact resume)."""

from __future__ import annotations

import copy
import csv
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import TINY_MODEL, make_prepared

import mlla_fast
import mlla_fast.train as train_module
from mlla_fast import graphs
from mlla_fast.backend import TRITON_INSTALLED
from mlla_fast.graphs import GraphedStep, preserved_training_state
from mlla_fast.runs import TrainConfig, load_checkpoint

from tolerance import rel_err

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

SMALL_UNET = dict(embed_dim=32, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                  drop_path_rate=0.0)


def never_called(*inputs):
    raise AssertionError("the step must not run when its inputs are rejected")


# --------------------------------------------------------------------------------------------------
# Error paths (no CUDA needed: the checks come before any CUDA call)
# --------------------------------------------------------------------------------------------------


def test_no_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device.*is_available\(\) is False"):
        GraphedStep(never_called, torch.zeros(2))


def test_inputs_must_be_cuda_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=r"input 0: expected a CUDA tensor, got a torch.float32 tensor .* on cpu"):
        GraphedStep(never_called, torch.zeros(2))
    with pytest.raises(ValueError, match=r"input 0: expected a torch\.Tensor, got list"):
        GraphedStep(never_called, [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one input tensor"):
        GraphedStep(never_called)


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_must_be_a_positive_int(warmup):
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphedStep(never_called, torch.zeros(2), warmup=warmup)


def test_fn_must_be_callable():
    with pytest.raises(ValueError, match="fn must be callable"):
        GraphedStep("step", torch.zeros(2))


def test_replay_inputs_must_match_the_captured_ones():
    static = (torch.zeros(2, 3), torch.zeros(4, dtype=torch.int64))
    graphs._check_replay_inputs(static, (torch.ones(2, 3), torch.ones(4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="captured with 2 inputs, got 1"):
        graphs._check_replay_inputs(static, (torch.ones(2, 3),))
    expected = r"input 0: expected a torch.float32 tensor of shape \(2, 3\) on cpu \(as captured\), got a "
    with pytest.raises(ValueError, match=expected + r"torch.float32 tensor of shape \(3, 2\)"):
        graphs._check_replay_inputs(static, (torch.ones(3, 2), static[1]))
    with pytest.raises(ValueError, match=expected + r"torch.float64 tensor of shape \(2, 3\)"):
        graphs._check_replay_inputs(static, (torch.ones(2, 3, dtype=torch.float64), static[1]))
    with pytest.raises(ValueError, match=r"input 0: expected .* on cpu \(as captured\), got .* on meta"):
        graphs._check_replay_inputs(static, (torch.ones(2, 3, device="meta"), static[1]))
    with pytest.raises(ValueError, match=r"input 1: expected a torch\.Tensor, got NoneType"):
        graphs._check_replay_inputs(static, (static[0], None))


# --------------------------------------------------------------------------------------------------
# On CUDA
# --------------------------------------------------------------------------------------------------


@needs_cuda
def test_replay_reads_new_inputs_and_returns_the_static_output():
    x = torch.arange(6.0, device="cuda").reshape(2, 3)
    calls = []

    def step(t):
        calls.append(1)
        return t * 2 + 1

    graphed = GraphedStep(step, x, warmup=2)
    assert len(calls) == 3  # two warm-up calls and the capture; replays run no Python
    first = graphed(torch.ones(2, 3, device="cuda"))
    torch.testing.assert_close(first, torch.full((2, 3), 3.0, device="cuda"))
    second = graphed(x)
    assert second is first and len(calls) == 3
    torch.testing.assert_close(second, x * 2 + 1)
    with pytest.raises(ValueError, match=r"expected a torch.float32 tensor of shape \(2, 3\) on cuda:\d"):
        graphed(torch.ones(3, 2, device="cuda"))
    with pytest.raises(ValueError, match=r"got a torch.float32 tensor of shape \(2, 3\) on cpu"):
        graphed(torch.ones(2, 3))


@needs_cuda
def test_captures_share_one_side_stream():
    """Every capture on a device warms up and captures on one side stream: cuBLAS keeps a workspace per stream
    it has run on for the rest of the process (66 MiB on an H100), so a stream per capture left that much
    allocated after each graph was gone."""
    weight = torch.randn(64, 64, device="cuda")

    def step(t):
        return t @ weight

    first = GraphedStep(step, weight)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    second = GraphedStep(step, weight)
    second(torch.ones_like(weight))
    del second
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert first(weight) is first.output


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graphed_training_matches_eager(backend, monkeypatch):
    """Three graphed steps against three eager steps of a twin from the same state, in fp32: the same
    kernels in the same order, so the losses, parameters and BatchNorm statistics agree to 1e-5.

    cuDNN's deterministic algorithms only: the input gradient of the stem's stride-2 convolution is
    otherwise not reproducible from run to run (on an H200 two eager runs from one state differed by
    ~1e-9 in the stem's weight gradients, fused and reference head alike), and three steps of training
    made that 5e-4 relative in a BatchNorm bias of ~1e-4, failing about half the runs.

    SGD with momentum, not AdamW: a parameter whose gradient is zero in exact arithmetic (a convolution
    bias followed by BatchNorm) gets rounding noise, and Adam turns noise of either sign into steps of
    the full learning rate, so two correct runs can differ by ~lr there. (On an H200 the graphed and
    eager fused runs differed by 6e-4 relative in such a bias under AdamW.) SGD keeps rounding
    differences at rounding size. AdamW under capture is exercised by ``benchmarks/model.py``."""
    if backend == "triton" and not TRITON_INSTALLED:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    device = torch.device("cuda")

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = mlla_fast.create_model("tiny", num_classes=3, img_size=64, backend=backend, **SMALL_UNET).to(device)
        return model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)

    gen = torch.Generator(device).manual_seed(1)
    batches = [(torch.randn(2, 3, 64, 64, generator=gen, device=device),
                torch.randint(0, 3, (2, 64, 64), generator=gen, device=device)) for _ in range(4)]
    model, optimizer = build()
    graphed = GraphedStep(_train_step(model, optimizer), *batches[0])
    # The warm-up trained the model for real: the eager twin starts from the state it left.
    twin, twin_optimizer = build()
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    eager = _train_step(twin, twin_optimizer)

    graph_losses, eager_losses = [], []
    for x, y in batches[1:]:
        graph_losses.append(graphed(x, y).item())
        eager_losses.append(eager(x, y).item())
    assert len(set(graph_losses)) == 3, f"the replays did not see new batches: {graph_losses}"
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-5, atol=0)
    state, twin_state = model.state_dict(), twin.state_dict()
    for name, value in state.items():
        if value.is_floating_point():
            assert rel_err(value, twin_state[name]) <= 1e-5, f"{name}: {rel_err(value, twin_state[name]):.2e}"
        else:
            assert torch.equal(value, twin_state[name]), name


# --------------------------------------------------------------------------------------------------
# preserved_training_state (CPU)
# --------------------------------------------------------------------------------------------------


def _small_net_and_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(16, 4)).square().mean().backward()
        optimizer.step()

    return model, optimizer, step


def test_preserved_training_state_restores_weights_buffers_optimizer_and_rng_in_place():
    model, optimizer, step = _small_net_and_step()
    step()  # every parameter has optimizer state now
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    addresses = [t.data_ptr() for t in (*model.parameters(), *model.buffers())]
    rng = torch.get_rng_state()
    with preserved_training_state(model, optimizer):
        step()
        step()
        assert not torch.equal(model[0].weight, weights["0.weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name  # BatchNorm statistics and its step count included
    for param_id, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt_state["state"][param_id][key]), (param_id, key)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [t.data_ptr() for t in (*model.parameters(), *model.buffers())] == addresses


def test_preserved_training_state_zeroes_optimizer_state_created_inside():
    model, optimizer, step = _small_net_and_step()
    weights = copy.deepcopy(model.state_dict())
    with preserved_training_state(model, optimizer):
        step()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    states = list(optimizer.state.values())
    assert len(states) == len(list(model.parameters()))
    for state in states:  # AdamW's fresh state: zero moments, step 0
        assert all(not value.any() for value in state.values())


def test_train_cuda_graph_needs_cuda(tmp_path):
    config = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device, but this run trains on cpu"):
        train_module.train(config, progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# mlla-fast train --cuda-graph (CUDA)
# --------------------------------------------------------------------------------------------------


def _losses(run) -> list[float]:
    with open(run / "train_log.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("phantom"))


def _cuda_config(prepared, out, **overrides) -> TrainConfig:
    values = dict(data=str(prepared), out=str(out), model_args=TINY_MODEL, iterations=9, batch_size=4, image_size=64,
                  val_every=3, log_every=1, workers=0, device="cuda", backend="auto", lr=2e-3)
    values.update(overrides)
    return TrainConfig(**values)


@needs_cuda
def test_train_cuda_graph_starts_where_eager_does_and_trains(prepared, tmp_path):
    """The capture's warm-up steps are undone: the first logged loss (the forward of the initial weights on
    the first batch, the same kernels either way) equals eager's; later steps differ only by rounding
    (capturable AdamW computes its bias corrections on the device), so the losses stay close."""
    eager = train_module.train(_cuda_config(prepared, tmp_path / "eager"), progress=False)
    graph = train_module.train(_cuda_config(prepared, tmp_path / "graph", cuda_graph=True), progress=False)
    assert eager["iteration"] == graph["iteration"] == 9
    eager_losses, graph_losses = _losses(tmp_path / "eager"), _losses(tmp_path / "graph")
    assert len(set(graph_losses)) == 9, f"the replays did not see new batches: {graph_losses}"
    assert graph_losses[0] == pytest.approx(eager_losses[0], rel=1e-6, abs=0)
    torch.testing.assert_close(graph_losses, eager_losses, rtol=5e-2, atol=0)


@needs_cuda
def test_train_cuda_graph_resumes_exactly(prepared, tmp_path, monkeypatch):
    """A graphed run that dies after its checkpoint of iteration 3 and is resumed (with a fresh capture)
    ends bitwise equal to an uninterrupted graphed run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_module.train(_cuda_config(prepared, straight, cuda_graph=True), progress=False)

    real_save = train_module.save_checkpoint

    def die_after_three(state, path):
        if state["iteration"] > 3:
            raise KeyboardInterrupt("killed")
        real_save(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", die_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(_cuda_config(prepared, killed, cuda_graph=True), progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert load_checkpoint(killed, "last")["iteration"] == 3
    train_module.train(_cuda_config(prepared, killed, cuda_graph=True), resume=True, progress=False)

    a, b = load_checkpoint(straight, "last"), load_checkpoint(killed, "last")
    assert a["iteration"] == b["iteration"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert _losses(straight) == _losses(killed)
