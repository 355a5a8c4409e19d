"""`.ci/gpu_check.py` (`make gpu-check`) on CPU: a failing benchmark is recorded (its headline keys null, its error
kept) and the next one still runs; the final JSON line carries the headline keys and is saved under $OUT; a CPU run
never writes benchmarks/results/gpu/. The slow test runs every benchmark's own CPU dry run through the harness."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.benchmarks.run_script import ROOT

REQUIRED = ("bench", "device", "sampler_vs_hf_256", "decode_step_ms_256", "fused_fwd_peak_frac", "fused_bwd_over_fwd",
            "fused_mem_frac_naive", "dash_grpo_ratio")


def _harness():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / ".ci/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(module, monkeypatch, tmp_path, *argv) -> tuple[int, dict, str]:
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--install", "skip", "--no-tests", *argv])
    rc = module.main()
    saved = json.loads((tmp_path / "out/gpu_check.json").read_text())
    return rc, saved, (tmp_path / "out/bench.log").read_text()


@pytest.mark.slow
def test_a_failing_benchmark_is_recorded_and_the_next_still_runs(monkeypatch, tmp_path, capsys):
    module = _harness()
    fail = ["-c", "import sys; print('table'); sys.exit('sampler exploded')"]
    ok = ["-c", "import json; print('table'); print(json.dumps({'ratio': 0.25, 'dash_s_per_step': 0.1}))"]
    monkeypatch.setattr(module, "BENCHES", {"bench_sampler": (None, fail, 60), "bench_step_time": (None, ok, 60)})
    monkeypatch.setattr(module, "RESULTS_FILE", tmp_path / "results/gpu_check.json")
    rc, saved, log = _run(module, monkeypatch, tmp_path, "--bench-dry-run")
    assert rc == 1 and [s for s in saved["failed_steps"] if s.startswith("bench")] == ["bench_sampler"]
    assert "sampler exploded" in saved["bench_errors"]["bench_sampler"]
    assert saved["sampler_vs_hf_256"] is None and saved["dash_grpo_ratio"] == 0.25  # the later step still ran
    assert set(REQUIRED) <= set(saved) and saved["bench"] == "gpu_check"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved  # the last line of stdout
    assert not (tmp_path / "results").exists()  # no GPU: nothing under benchmarks/results/gpu
    assert "sampler exploded" in log


@pytest.mark.slow
def test_every_benchmark_dry_run_passes_through_the_harness(monkeypatch, tmp_path):
    module = _harness()
    monkeypatch.setattr(module, "RESULTS_FILE", tmp_path / "results/gpu_check.json")
    rc, saved, _ = _run(module, monkeypatch, tmp_path, "--bench-dry-run", "--budget-s", "1500")
    steps = {r["step"]: r for r in saved["steps"]}
    ran = [s for s, (_, dry, _) in module.BENCHES.items() if dry is not None]
    assert {s: steps[s]["status"] for s in ran} == dict.fromkeys(ran, "ok"), saved["bench_errors"]
    assert rc == 0 and set(REQUIRED) <= set(saved) and saved["device"] == "cpu"
    assert all(steps[s]["result"]["bench"] for s in ran)  # each step's own JSON line was read back
    assert steps["bench_fused_loss"]["status"] == "skipped"  # no dry run of its own
