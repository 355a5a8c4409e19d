"""`benchmarks/rl_crosscheck.py`: its independent loop and its end-to-end runs.

- A left-padded batch in the independent loop computes, row by row, what each prompt computes alone (greedy tokens and
  the log-probs the policy gradient uses), so prompts of several lengths (data.task=scratchpad) can share a batch.
- End to end for 2 steps on arith: the independent arm (transformers' Qwen2 with its own decoding and reward loop)
  must score the warm start exactly as dash's evaluation does before any update, or the cross-check would compare
  different models or held-out sets.
- End to end on scratchpad (variable prompt and completion lengths): every arm runs and the per-seed claim table is
  written; one seed never makes the claim hold.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.benchmarks.run_script import ROOT, run_benchmark

sys.path.insert(0, str(ROOT / "benchmarks"))

# In float64 a row's numbers change with the batch it sits in only by summation order (~1e-15); a pad token that
# leaks into attention moves a log-prob by O(0.1) (the negative control below checks that this test would see it).
FP64_ATOL = 1e-10
LEAK_MIN = 1e-3


@pytest.mark.slow  # imports transformers and the trainer: ~5-10 s
def test_left_padded_rows_compute_what_they_would_alone():
    from rl_crosscheck import Budget, Independent

    from dash.rewards import get_reward
    from dash.runtime import resolve_model_path

    budget = Budget(steps=1, eval_every=1, lr=1e-4, prompts=3, group=1, max_new=12, eval_max_new=12, sft_batch=3)
    arm = Independent(resolve_model_path("builtin:tiny-add-sft"), ([], []), get_reward("arith"), budget, seed=0)
    arm.model.double()
    texts = ["12+34+56=", "01+02+03+04+05=", "999+1=", "7+8="]  # 9, 15, 6 and 4 tokens
    ids, pmask = arm.encode(texts)  # [4, 15]
    assert pmask.sum(1).tolist() == [9, 15, 6, 4] and ids.shape == (4, 15)
    comp, cmask = arm.decode(ids, pmask, greedy=True, max_new=budget.max_new)  # [4, L]
    logp = arm.token_logp(ids, pmask, comp).detach()  # [4, L]
    leaked = arm.token_logp(ids, torch.ones_like(pmask), comp).detach()  # pads attended to: the negative control
    worst_leak = 0.0
    for i, text in enumerate(texts):
        one_ids, one_mask = arm.encode([text])  # [1, P_i], no padding
        one_comp, one_cmask = arm.decode(one_ids, one_mask, greedy=True, max_new=budget.max_new)
        n = int(cmask[i].sum())
        assert int(one_cmask[0].sum()) == n and torch.equal(one_comp[0, :n], comp[i, :n]), text
        one_logp = arm.token_logp(one_ids, one_mask, one_comp).detach()[0, :n]
        torch.testing.assert_close(logp[i, :n], one_logp, rtol=0, atol=FP64_ATOL)
        worst_leak = max(worst_leak, float((leaked[i, :n] - one_logp).abs().max()))
    assert worst_leak > LEAK_MIN  # without the mask the padded rows differ: the check above can fail


@pytest.mark.slow
def test_crosscheck_runs_and_all_arms_start_from_the_same_accuracy(tmp_path):
    out = tmp_path / "cc"
    record = run_benchmark("rl_crosscheck.py", out, "--steps", "2", "--eval-every", "1", "--seeds", "1")
    starts = {arm: record[f"{arm}_curve"][0] for arm in ("trainer", "independent", "supervised")}
    assert len(set(starts.values())) == 1, starts
    assert 0.1 < record["acc_start"] < 0.5  # the shipped warm start's band (0.256)
    assert all(len(record[f"{arm}_curve"]) == 3 for arm in starts)
    assert record["seeds"] == [0] and record["lr"] == 2e-5 and record["group_size"] == 4  # from configs/tiny.yaml
    assert record["claim"]["seeds"] == 1 and record["claim"]["holds"] is False  # one seed never makes the claim
    report = out.with_suffix(".md").read_text()
    assert "| s / step |" in report and "does not hold** (only 1 seed(s)" in report
    assert record["eval_steps"] == [0, 1, 2] and out.with_suffix(".png").stat().st_size > 0  # the curves' plot


@pytest.mark.slow
def test_crosscheck_on_the_scratchpad_task(tmp_path):
    """Prompts of 3-5 terms and completions up to sampling.max_new_tokens=25 through all three arms, from the shipped
    scratchpad warm start; one step checks the plumbing, not learning."""
    out = tmp_path / "sp"
    record = run_benchmark("rl_crosscheck.py", out, "--config", str(ROOT / "configs/tiny-scratchpad.yaml"),
                           "--steps", "1", "--seeds", "1", "--data.test_size=32")
    assert 0.2 < record["acc_start"] < 0.7  # the warm start's greedy accuracy (0.414 on all 500 prompts)
    assert record["task"] == "scratchpad" and record["max_new_tokens"] == 25 and record["group_size"] == 8
    assert record["prompts_per_step"] == 32 and record["eval_prompts"] == 32
    assert all(len(record[f"{arm}_curves"]) == 1 for arm in ("trainer", "independent", "supervised"))
    assert "| seed | trainer | independent | supervised | d = trainer - supervised |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [(["--arms", "trainer,nope"], "--arms: unknown ['nope']"),
                                           (["--seeds", "0"], "--seeds, --sft-batch >= 1")])
def test_crosscheck_rejects_bad_arguments(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/rl_crosscheck.py"), *args, "--out",
                           str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
