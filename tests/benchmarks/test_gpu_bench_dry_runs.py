"""The GPU benchmarks of `make gpu-check` dry-run on CPU at tiny shapes: sampler.py --gpu, decode_step.py and
step_time.py --random-model run the same code as on the GPU (model building, both providers, the profiler count,
a trainer at the paper preset's batch layout), end with the shared JSON line, and carry the keys .ci/gpu_check.py
reads. Their numbers mean nothing on this CPU; what is checked is that every path runs and reports."""

from __future__ import annotations

import pytest

from tests.benchmarks.run_script import run_benchmark


@pytest.mark.slow
def test_sampler_gpu_dry_run_times_dash_and_hf_at_both_batches(tmp_path):
    record = run_benchmark("sampler.py", tmp_path / "s", "--gpu", "--dry-run", "--repeats", "1")
    assert record["mode"] == "gpu" and record["dry_run"] and record["device"] == "cpu"
    assert record["sampling"] == {"temperature": 0.9, "top_k": 50, "top_p": 1.0, "page_size": 256}  # the preset's
    for batch in (2, 4):
        assert record[f"dash_tok_s_{batch}"] > 0 and record[f"hf_tok_s_{batch}"] > 0
        assert record[f"sampler_vs_hf_{batch}"] == pytest.approx(
            record[f"dash_tok_s_{batch}"] / record[f"hf_tok_s_{batch}"], abs=0.01)


@pytest.mark.slow
def test_decode_step_dry_run_counts_the_extra_decode_steps(tmp_path):
    record = run_benchmark("decode_step.py", tmp_path / "d", "--dry-run", "--repeats", "1")
    assert record["dry_run"] and record["event_unit"] == "CPU ops" and record["batch"] == 4
    for mode, suffix in (("graphs", ""), ("eager", "_eager")):  # on CPU the graphs row falls back to eager
        short, long = (record["events"][f"{mode}/{n}"] for n in record["new_tokens"])
        assert long > short > 0  # 32 more decode steps launch more work
        assert record[f"launches_per_step_4{suffix}"] == pytest.approx((long - short) / 32, abs=0.1)
        assert f"decode_step_ms_4{suffix}" in record and record["graph_steps"][mode] == 0
    assert record["launches"] == record["events"]  # on CPU both count the profiler's CPU ops


@pytest.mark.slow
def test_step_time_random_model_trains_both_algorithms_at_the_presets_layout(tmp_path):
    record = run_benchmark("step_time.py", tmp_path / "t", "--config", "configs/qwen2.5-0.5b-math.yaml",
                           "--random-model", "tiny", "--steps", "1", "--skip-paper-mb", "--plot", "",
                           "--model.device=cpu", "--model.dtype=float32", "--sampling.max_new_tokens=4",
                           "--train.prompts_per_step=8")
    assert record["random_model"] == "tiny" and record["max_new_tokens"] == 4
    assert [v["name"] for v in record["variants"]] == ["grpo", "dash"]
    grpo, dash = record["variants"]
    assert grpo["sampling_calls"] == 4 and dash["sampling_calls"] == 1  # 32 samples: 8 per GRPO call, 1 DASH call
    assert record["ratio"] == pytest.approx(record["dash_s_per_step"] / record["grpo_s_per_step"])
