"""Data parallelism with torchrun on CPU (2 processes, gloo): the update equals the single-process one on the same
global batch, with filtering leaving the ranks unequal work (rank 1 has zero kept samples); a 2-process run
finishes, resumes from its checkpoint and logs once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dash.rl.step import PolicyUpdate, run_step
from tests.rl.test_update_equivalence import (GRAD_RTOL, PROMPTS, FixedSampler, config, make_rollout, tiny_model)

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
FIXED_ROLLOUT_SEED = 7
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def make_cfg():
    import dataclasses

    cfg = config("dr_grpo", "global", 0.0, token_budget=30)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=0.0))


def one_update_setup():
    cfg = make_cfg()
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return cfg, model, opt, sched


def _torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(WORKER), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to this python")


def test_two_process_update_equals_single_process(tmp_path):
    out = tmp_path / "update.pt"
    proc = _torchrun("update", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    rank1 = torch.load(str(out) + ".rank1")
    assert rank1["metrics"]["rollout/rank_kept_frac"] == 0.0  # rank 1 had nothing to train on
    assert got["metrics"]["rollout/rank_kept_frac"] > 0.0

    cfg, model, opt, sched = one_update_setup()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    sampler = FixedSampler(make_rollout(seed=FIXED_ROLLOUT_SEED, rank_skew=True))
    metrics, _ = run_step(cfg, sampler, PolicyUpdate(cfg, model, opt, sched), list(range(PROMPTS)), 0)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    assert expected.abs().max() > 0
    assert (got["update"] - expected).abs().max() <= GRAD_RTOL * expected.abs().max()
    assert got["metrics"]["rollout/kept_frac"] == metrics["rollout/kept_frac"]  # global metrics are all-reduced


def test_two_process_run_finishes_resumes_and_logs_once(tmp_path):
    from dash.model_io import save_model
    from dash.tasks.warmstart import build_tiny_model
    from dash.tokenizer import build_arith_tokenizer

    model_dir = tmp_path / "model"
    save_model(build_tiny_model(seed=1), model_dir, tokenizer=build_arith_tokenizer())
    out = tmp_path / "run"
    first = _torchrun("train", model_dir, out, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun("train", model_dir, out, 3, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "time/step_s" in x]
    assert steps == [1, 2, 3]  # rank 0 alone logs; the resumed run continues at step 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"
