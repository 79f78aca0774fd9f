"""Training runs on CPU with a tiny model: exact resume after SIGKILL, divergence, bad folders, the recipe."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from train_helpers import REPO, TINY_MODEL, cli_env, make_prepared, run_cli, train_args

import mlla_fast.train as train_module
from mlla_fast.cli import main
from mlla_fast.data import VolumeDataset
from mlla_fast.distributed import DistContext
from mlla_fast.losses import DiceCELoss
from mlla_fast.runs import TrainConfig, build_model, load_checkpoint, save_config

# Runs train_module through the CLI, but when the checkpoint of iteration >= HANG_AT is about to be
# written it leaves a marker and hangs, so the test can SIGKILL it well after the previous checkpoint.
KILLABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import mlla_fast.train as train_module
    from mlla_fast.cli import main

    marker, hang_at = Path(sys.argv[1]), int(sys.argv[2])
    real_save = train_module.save_checkpoint

    def save_or_hang(state, path):
        if state["iteration"] >= hang_at:
            marker.write_text(str(state["iteration"]))
            time.sleep(600)
        real_save(state, path)

    train_module.save_checkpoint = save_or_hang
    sys.exit(main(sys.argv[3:]))
    """
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(prepared, out, **overrides) -> TrainConfig:
    values = dict(data=str(prepared), out=str(out), model_args=TINY_MODEL, iterations=4, batch_size=4, image_size=32,
                  val_every=2, log_every=1, workers=0, device="cpu", backend="torch", lr=2e-3)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_killed_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_run(prepared, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_cli(train_args(prepared, straight, iterations=9))
    assert done.returncode == 0, done.stderr

    marker = tmp_path / "hanging"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), "6", *train_args(prepared, killed,
                            iterations=9)], env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "the run to be killed ended before its second checkpoint"
            assert time.monotonic() < deadline, "the run to be killed did not reach its second checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert load_checkpoint(killed, "last")["iteration"] == 3  # iterations 4-6 were done, then lost
    assert not list(killed.glob("*.tmp"))

    resumed = run_cli([*train_args(prepared, killed, iterations=9, workers=2), "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a, b = load_checkpoint(straight, "last"), load_checkpoint(killed, "last")
    assert a["iteration"] == b["iteration"] == 9
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert a["scheduler"] == b["scheduler"]
    assert a["best_dice"] == b["best_dice"] and a["best_iteration"] == b["best_iteration"]
    # the killed run's rows after its checkpoint were dropped: the logs read as one run
    rows_a, rows_b = read_log(straight / "train_log.csv"), read_log(killed / "train_log.csv")
    assert [r["iteration"] for r in rows_b] == [str(i) for i in range(1, 10)]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert read_log(straight / "val_log.csv") == read_log(killed / "val_log.csv")


def test_learning_rate_is_the_one_asked_for_with_a_cosine_to_the_minimum(prepared, tmp_path, one_thread):
    summary = train_module.train(tiny_config(prepared, tmp_path / "run", lr=3e-3), progress=False)
    assert summary["iteration"] == 4
    rows = read_log(tmp_path / "run" / "train_log.csv")
    for row in rows:  # the lr logged at iteration t is the one its step used: cosine at t - 1 of 4
        t = int(row["iteration"]) - 1
        assert float(row["lr"]) == pytest.approx(1e-6 + (3e-3 - 1e-6) * (1 + math.cos(math.pi * t / 4)) / 2, rel=1e-4)
    state = load_checkpoint(tmp_path / "run", "last")
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)
    saved = TrainConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved.lr == 3e-3 and saved.loss_weights == [0.5, 0.5]
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_validation_uses_the_val_split_only_and_returns_to_train_mode(prepared, tmp_path, monkeypatch, one_thread):
    opened = []

    class Spy(VolumeDataset):
        def __init__(self, folder, split="test"):
            opened.append(split)
            super().__init__(folder, split)

    monkeypatch.setattr(train_module, "VolumeDataset", Spy)
    config = tiny_config(prepared, tmp_path / "run", iterations=2, val_every=1)
    train_module.train(config, progress=False)
    assert opened == ["val"]

    model = build_model(config, 6)
    model.train()
    scores = train_module.validate(model, VolumeDataset(prepared, "val"), config, DistContext(0, 1, 0,
                                   torch.device("cpu")))
    assert all(m.training for m in model.modules())
    assert 0.0 <= scores["dice"] <= 1.0 and "dice_liver" in scores


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch,
                                                                                 capsys, one_thread):
    calls = {"n": 0}

    class PoisonedLoss(DiceCELoss):
        def forward(self, logits, target):
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_module, "DiceCELoss", PoisonedLoss)
    out = tmp_path / "run"
    assert main(train_args(prepared, out, iterations=8, val_every=2)) == 3
    err = capsys.readouterr().err
    assert "loss became nan at iteration 5" in err and str(out / "last.pt") in err
    state = load_checkpoint(out, "last")
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_unwritable_run_folder_fails_before_anything_else(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(train_args(tmp_path / "no_data", blocker / "run")) == 2
    err = capsys.readouterr().err
    assert "cannot write to the run folder" in err and "no_data" not in err


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p.mkdir() or p], ids=["missing", "unprepared"])
def test_missing_or_unprepared_data_says_to_run_prepare(tmp_path, capsys, make):
    data = make(tmp_path / "data")
    assert main(train_args(data, tmp_path / "run")) == 2
    assert "mlla-fast prepare" in capsys.readouterr().err


def test_existing_runs_are_not_overwritten_and_resume_keeps_the_settings(prepared, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    train_module.train(tiny_config(prepared, out, iterations=2), progress=False)
    assert main(train_args(prepared, out, iterations=2)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.1"]) == 2
    assert "lr: saved 0.002, given 0.1" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "not a training run" in capsys.readouterr().err


def test_evaluating_a_run_without_checkpoints_says_so(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    save_config(out, tiny_config(prepared, out), {"class_names": ["background"], "num_classes": 1})
    assert main(["evaluate", "--run", str(out)]) == 2
    assert "no best.pt" in capsys.readouterr().err


def test_pretrained_weights_load_through_the_imagenet_mapping_on_fresh_runs_only(prepared, tmp_path, monkeypatch,
                                                                                  one_thread):
    config = tiny_config(prepared, tmp_path / "run", iterations=2, val_every=2)
    encoder = {k: torch.full_like(v, 0.5) for k, v in build_model(config, 6).state_dict().items()
               if k.startswith("layers.0.blocks.0.norm1")}
    checkpoint = tmp_path / "mlla_t.pth"
    torch.save({"model": {**encoder, "head.weight": torch.zeros(3, 3)}}, checkpoint)
    loaded = []
    real = train_module.load_imagenet_pretrained

    def spy(model, path):
        result = real(model, path)
        loaded.append(result[0])
        assert torch.equal(model.layers_up[3].blocks[0].norm1.weight, torch.full((32,), 0.5))  # mirrored to the decoder
        return result

    monkeypatch.setattr(train_module, "load_imagenet_pretrained", spy)
    config.pretrained = str(checkpoint)
    train_module.train(config, progress=False)
    assert loaded == [sorted(["layers.0.blocks.0.norm1.weight", "layers.0.blocks.0.norm1.bias",
                              "layers_up.3.blocks.0.norm1.weight", "layers_up.3.blocks.0.norm1.bias"])]
    config.iterations = 2
    train_module.train(config, resume=True, progress=False)
    assert len(loaded) == 1
