"""The DistributedDataParallel path on CPU: two processes over gloo, started by torchrun."""

import csv
import subprocess
import sys

import pytest
from train_helpers import REPO, cli_env, make_prepared, train_args

from mlla_fast.runs import load_checkpoint


@pytest.mark.slow
def test_two_process_gloo_run_trains_with_only_rank_0_writing(tmp_path):
    prepared = make_prepared(tmp_path)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mlla_fast",
               *train_args(prepared, out, iterations=4, val_every=2)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr

    state = load_checkpoint(out, "last")
    assert state["iteration"] == 4 and state["world_size"] == 2
    assert len(state["rng"]) == 2  # every rank's RNG state, for an exact resume
    assert not any(key.startswith("module.") for key in state["model"])  # the bare model's names
    with open(out / "train_log.csv", newline="") as f:
        assert [row["iteration"] for row in csv.DictReader(f)] == ["1", "2", "3", "4"]
    with open(out / "val_log.csv", newline="") as f:
        assert [row["iteration"] for row in csv.DictReader(f)] == ["2", "4"]
    assert done.stdout.count("trained 4/4 iterations") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no write probes left
