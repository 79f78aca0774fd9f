"""The benchmark scripts on CPU: they run, write well-formed results, fit slopes and mark/drop variants."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def cpu_env() -> dict[str, str]:
    """The environment of a CPU-only subprocess: no CUDA device, compiled Triton (not the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def bench() -> dict[str, ModuleType]:
    """benchmarks.common and benchmarks.scaling, imported from the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        yield {name: importlib.import_module(f"benchmarks.{name}") for name in ("common", "scaling")}


# --------------------------------------------------------------------------------------------------
# Slope fit, sweep marking, measurement
# --------------------------------------------------------------------------------------------------


def test_slope_fit_linear_and_quadratic(bench):
    fit = bench["common"].fit_loglog_slope
    pixels = [s * s for s in (64, 128, 256, 512, 1024, 2048)]
    assert fit(pixels, [3e-6 * p for p in pixels]) == pytest.approx(1.0, abs=1e-9)
    assert fit(pixels, [1e-9 * p * p for p in pixels]) == pytest.approx(2.0, abs=1e-9)
    # launch-bound points below the fit range do not bend the slope; missing points are left out
    launch_bound = [max(0.05, 1e-6 * p) for p in pixels]
    assert fit(pixels, launch_bound, min_x=256**2) == pytest.approx(1.0, abs=1e-9)
    assert fit(pixels, [None, None, 1.0, None, 16.0, None], min_x=256**2) == pytest.approx(1.0, abs=1e-9)
    assert fit(pixels, [1.0] + [None] * 5) is None


def test_sweep_marks_and_drops_variants(bench):
    common = bench["common"]
    M = common.Measurement
    calls: list[tuple[str, int]] = []

    def run(key: str, point: int):
        calls.append((key, point))
        if key == "oom" and point >= 2:
            return M(common.OOM, note="CUDA out of memory")
        if key == "slow" and point >= 3:
            return M(common.TIMEOUT, note="3.00 s per call > budget 2 s")
        if key == "broken":
            return M(common.ERROR, note="ValueError: cannot build")
        if key == "quadratic":
            return M(common.OK, median_ms=1000.0 * point**2)  # 1 s, 4 s, then 9 s projected
        return M(common.OK, median_ms=1.0 * point)

    keys = ["linear", "oom", "slow", "broken", "quadratic"]
    out = common.sweep([1, 2, 3, 4], keys, run, size=float, budget_s=5.0, describe=lambda p: f"size {p}")
    got = {(k, p): m for k, p, m in out}
    assert len(out) == 20
    assert all(got[("linear", p)].status == "ok" for p in (1, 2, 3, 4))
    assert [got[("oom", p)].status for p in (1, 2, 3, 4)] == ["ok", "oom", "skipped", "skipped"]
    assert got[("oom", 3)].note == "after oom at size 2"
    assert [got[("slow", p)].status for p in (1, 2, 3, 4)] == ["ok", "ok", "timeout", "skipped"]
    assert [got[("broken", p)].status for p in (1, 2, 3, 4)] == ["error"] * 4
    assert got[("broken", 4)].note == "ValueError: cannot build"
    assert [got[("quadratic", p)].status for p in (1, 2, 3, 4)] == ["ok", "ok", "timeout", "skipped"]
    assert got[("quadratic", 3)].note.startswith("projected 9.0 s per call")
    # dropped variants never ran again
    for key, first_unrun in (("oom", 3), ("slow", 4), ("broken", 2), ("quadratic", 3)):
        assert (key, first_unrun) not in calls and (key, 4) not in calls


def test_measure_marks_oom_timeout_and_errors(bench):
    common = bench["common"]
    cpu = torch.device("cpu")
    timing = common.TimingConfig(budget_s=0.02, target_s=0.01, min_repeats=2, max_repeats=4, warmup=2)

    def build(step):
        return lambda: (step, lambda: (torch.randn(4),))

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    def bad_build():
        raise ValueError("no such variant")

    ok = common.measure(build(lambda x: x.sum()), cpu, timing)
    assert ok.status == "ok" and 2 <= ok.repeats <= 4 and ok.median_ms > 0 and ok.first_call_s is not None
    assert ok.min_ms <= ok.q25_ms <= ok.median_ms <= ok.q75_ms <= ok.max_ms
    assert common.measure(build(oom), cpu, timing).status == "oom"
    slow = common.measure(build(lambda x: time.sleep(0.05)), cpu, timing)
    assert slow.status == "timeout" and "budget" in slow.note
    err = common.measure(bad_build, cpu, timing)
    assert err.status == "error" and err.note == "ValueError: no such variant"
    with pytest.raises(ValueError, match="warmup >= 2"):
        common.TimingConfig(warmup=1)


def test_environment_and_output_paths(bench, tmp_path):
    common = bench["common"]
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    env = common.environment(torch.device("cpu"), bandwidth=False)
    for key in ("card", "driver_version", "torch_version", "triton_version", "cuda_version", "git_commit",
                "git_dirty", "date_utc", "copy_bandwidth_gbs"):
        assert key in env
    assert env["label"] == common.CPU_DEMO_LABEL
    assert common.output_dir(None, env) is None
    demo = common.output_dir(str(tmp_path), env)
    assert demo == tmp_path / "cpu-demo" and (demo / ".gitignore").read_text().strip().endswith("*")
    gpu_env = {**env, "label": common.GPU_LABEL, "card_slug": "nvidia-h100-80gb-hbm3"}
    assert common.output_dir(str(tmp_path), gpu_env) == tmp_path / "nvidia-h100-80gb-hbm3"
    assert common.jsonable({"a": math.nan, "b": (1, math.inf)}) == {"a": None, "b": [1, None]}


# --------------------------------------------------------------------------------------------------
# The block variants and the correctness check
# --------------------------------------------------------------------------------------------------


def test_softmax_variant_is_softmax_attention(bench):
    scaling = bench["scaling"]
    cpu, grid, dim, heads = torch.device("cpu"), (4, 6), 64, 2
    block = scaling.make_block("softmax", dim, heads, grid, scaling.block_weights(dim, heads, 0), cpu)
    attn = block.attn
    v, gate = torch.randn(2, 24, dim), torch.randn(2, 24, dim)
    q, k = attn.qk(v).chunk(2, dim=-1)

    def heads_of(t):
        return t.reshape(2, 24, heads, dim // heads).transpose(1, 2)

    weights = torch.softmax(heads_of(q) @ heads_of(k).transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
    expected = (weights @ heads_of(v)).transpose(1, 2).reshape(2, 24, dim)
    lepe = F.conv2d(v.transpose(1, 2).reshape(2, dim, *grid), attn.lepe.weight, attn.lepe.bias, padding=1, groups=dim)
    expected = (expected + lepe.flatten(2).transpose(1, 2)) * gate
    torch.testing.assert_close(attn(v, grid, gate=gate), expected, rtol=1e-5, atol=1e-5)


def test_correctness_check_passes_and_fails(bench):
    common, scaling = bench["common"], bench["scaling"]
    cpu, grid = torch.device("cpu"), (4, 6)
    weights = scaling.block_weights(32, 1, 0)
    reference = scaling.make_block("eager", 32, 1, grid, weights, cpu)
    same = scaling.make_block("eager", 32, 1, grid, weights, cpu)
    x = torch.randn(2, 24, 32)
    passed = common.check_against_reference(same, reference, x, torch.bfloat16)
    assert passed.passed and set(passed.errors) == {"output fp32", "input grad fp32", "output bfloat16",
                                                      "input grad bfloat16"}
    off = common.check_against_reference(lambda t: same(t) * 1.001, reference, x)
    assert not off.passed and "over the bound" in off.detail

    def broken(t):
        raise ValueError("backend='triton' cannot run here")

    failed = common.check_against_reference(broken, reference, x)
    assert not failed.passed and "cannot run here" in failed.detail
    with pytest.raises(ValueError, match="weights do not fit"):
        scaling.load_weights(same, {**weights, "extra.weight": torch.zeros(1)})
    # the compiled variant's construction, traced by dynamo (the "eager" backend: no C++/Triton build)
    compiled = scaling.make_block("compiled", 32, 1, grid, weights, cpu, compile_backend="eager")
    assert common.check_against_reference(compiled, reference, x).passed


# --------------------------------------------------------------------------------------------------
# The scripts' CPU paths, as users run them
# --------------------------------------------------------------------------------------------------

FAST = ("--min-repeats", "1", "--max-repeats", "2", "--target-seconds", "0.01", "--time-budget", "600")


def test_scaling_cpu_demo_writes_results(tmp_path):
    done = run_script("benchmarks/scaling.py", "--grids", "8", "16", "--variants", "eager", "softmax", "fused",
                      "--fit-min", "8", *FAST, "--out", str(tmp_path))
    assert "CPU demonstration, not a GPU result" in done.stdout and "No CUDA device found" in done.stdout
    out = tmp_path / "cpu-demo"
    stem = out / "scaling_C64_h2_B1_fp32"
    payload = json.loads(stem.with_suffix(".json").read_text())
    assert payload["label"] == "CPU demonstration, not a GPU result"
    assert payload["env"]["torch_version"] == torch.__version__ and "git_commit" in payload["env"]
    rows = payload["results"]
    assert len(rows) == 3 * 2 * 2
    status = {(r["variant"], r["mode"], r["grid"]): r["status"] for r in rows}
    assert {s for (v, _, _), s in status.items() if v != "fused"} == {"ok"}
    assert {s for (v, _, _), s in status.items() if v == "fused"} == {"skipped"}
    assert all(r["median_ms"] > 0 and r["repeats"] >= 1 for r in rows if r["status"] == "ok")
    slopes = {(s["variant"], s["mode"]): s for s in payload["slopes"]}
    assert isinstance(slopes[("eager", "fwd+bwd")]["time_slope"], float)
    with stem.with_suffix(".csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["env_torch_version"] == torch.__version__
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert (out / ".gitignore").exists()

    # --from-json: the same rows refitted (here from 16² up: one point each, so every variant falls back to
    # its two largest grids), nothing re-measured
    refit = run_script("benchmarks/scaling.py", "--from-json", str(stem.with_suffix(".json")), "--fit-min", "16")
    assert "largest measured" in refit.stdout and "rewrote" in refit.stdout
    again = json.loads(stem.with_suffix(".json").read_text())
    assert again["results"] == rows and again["config"]["fit_min"] == 16
    assert again["slopes_refitted"]["by"] == "benchmarks/scaling.py --from-json"
    assert all(s["fallback"] and s["grids"] == ["8x8", "16x16"] for s in again["slopes"] if s["variant"] != "fused")


def test_slope_fit_above_the_minimum_with_a_fallback(bench):
    """Slopes over the grids >= fit_min²; a variant with fewer than two points there (softmax attention,
    out of memory early) is fitted over its two largest measured grids and marked as such."""
    rows = []
    for variant, power, largest in (("fused", 1.0, 4096), ("softmax", 2.0, 256)):
        for side in (64, 128, 256, 512, 1024, 2048, 4096):
            ok = side <= largest
            rows.append({"variant": variant, "mode": "fwd", "grid": f"{side}x{side}", "pixels": side * side,
                         "status": "ok" if ok else "oom", "median_ms": 1e-6 * side ** (2 * power) + (5.0 if
                         side == 64 else 0.0) if ok else None, "peak_bytes": 100 * side * side if ok else None})
    slopes = {s["variant"]: s for s in bench["scaling"].fit_slopes(rows, 1024)}
    assert slopes["fused"]["grids"] == ["1024x1024", "2048x2048", "4096x4096"] and not slopes["fused"]["fallback"]
    assert slopes["fused"]["time_slope"] == pytest.approx(1.0) and slopes["fused"]["memory_slope"] == pytest.approx(1.0)
    # the launch-bound 64² point (+5 ms) is left out of the fallback fit
    assert slopes["softmax"]["fallback"] and slopes["softmax"]["grids"] == ["128x128", "256x256"]
    assert slopes["softmax"]["time_slope"] == pytest.approx(2.0)


def test_model_cpu_demo_writes_results(tmp_path):
    # the tiny config shrunk to one block per stage at C0 = 32, so that it runs in seconds on a CPU
    small = ("--embed-dim", "32", "--depths", "1", "1", "1", "1", "--depths-decoder", "1", "1", "1", "1",
             "--num-heads", "1", "2", "4", "8")
    variants = ("eager", "fused", "fused-graph", "eager-graph")
    done = run_script("benchmarks/model.py", "--models", "tiny", *small, "--sizes", "32:2", *FAST,
                      "--variants", *variants, "--out", str(tmp_path))
    assert "CPU demonstration, not a GPU result" in done.stdout
    payload = json.loads((tmp_path / "cpu-demo" / "model_tiny_fp32_32.json").read_text())
    assert payload["config"]["depths"] == [1, 1, 1, 1]
    rows = payload["results"]
    # the fused kernels and CUDA graphs need a GPU: those variants are marked skipped, with the reason
    expected = [(mode, v, "ok" if v == "eager" else "skipped") for mode in ("train", "infer") for v in variants]
    assert [(r["mode"], r["variant"], r["status"]) for r in rows] == expected
    ran = [r for r in rows if r["status"] == "ok"]
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 and r["image_size"] == 32 for r in ran)
    assert {r["note"] for r in rows if r["variant"].endswith("-graph")} == {
        "CUDA graphs need a CUDA device (CPU demonstration)"}
    assert all(r["images_per_s"] is None for r in rows if r["status"] == "skipped")
    assert rows[0]["model"] == "mlla_unet_tiny+custom"
    with (tmp_path / "cpu-demo" / "model_tiny_fp32_32.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(expected)


def test_micro_benchmarks_skip_without_cuda():
    done = run_script("-m", "pytest", "benchmarks/micro", "-q", "-rs", "-p", "no:cacheprovider")
    assert "skipped" in done.stdout and "no CUDA device here" in done.stdout and "error" not in done.stdout.lower()
