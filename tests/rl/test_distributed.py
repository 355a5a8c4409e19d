"""Data parallelism with torchrun on CPU (2 processes, gloo), DDP and FSDP2: the update equals the single-process one
on the same global batch, with filtering leaving the ranks unequal work (rank 1 has zero kept samples; under FSDP it
runs zero-weight padding micro-batches); a 2-process run finishes, resumes from its checkpoint and logs once; an FSDP
run resumed from its sharded checkpoint matches the uninterrupted run and resumes on one process too.

Tolerance of the 2-process update: DP_RTOL = 1e-5 of the largest entry. The two sides run the same kernels on the
same samples; they differ in how fp32 sums are split (each rank packs and accumulates its own samples, then the
all-reduce / reduce-scatter adds the ranks' sums, vs one packing and accumulation in one process), i.e. rounding of
~1e-7 per addition, amplified where positive and negative advantages cancel. Measured with UPDATE_LR = 1: exactly 0
when rank 1 trains on nothing (x + 0 is exact) and 5.2e-7 when both ranks train, identical for DDP and FSDP.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dash.rl.step import PolicyUpdate, run_step
from tests.rl.test_update_equivalence import PROMPTS, FixedSampler, config, make_rollout, tiny_model
from tests.tiny_models import save_tiny_dash_model

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
FIXED_ROLLOUT_SEED = 7
# SGD step of the one-update tests: large, so that the update (w_after - w_before, rounded to fp32 weights ~0.1-0.5)
# resolves the gradient to ~1e-7 relative; at lr 1e-2 one ulp of a weight is already ~1e-5 of the largest update.
UPDATE_LR = 1.0
DP_RTOL = 1e-5  # ~20x the measured difference (module docstring)
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def make_cfg():
    import dataclasses

    cfg = config("dr_grpo", "global", 0.0, token_budget=30)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=0.0))


def one_update_setup(shard=None):
    """`shard`: applied to the model before the optimizer is built (FSDP: the optimizer holds the shards)."""
    cfg = make_cfg()
    model = tiny_model()
    if shard is not None:
        shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=UPDATE_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return cfg, model, opt, sched


def _torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(WORKER), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# every test here starts torchrun processes (tens of seconds each): `slow`, out of `make test-fast`
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to this python")]


@pytest.mark.parametrize("skew", [True, False], ids=["rank1-idle", "both-ranks-train"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_update_equals_single_process(tmp_path, mode, skew):
    out = tmp_path / "update.pt"
    flags = (["--fsdp"] if mode == "fsdp" else []) + ([] if skew else ["--both-ranks-train"])
    proc = _torchrun("update", out, *flags)
    assert proc.returncode == 0, proc.stderr[-8000:]  # room for both ranks' faulthandler stacks
    got = torch.load(out)
    rank1 = torch.load(str(out) + ".rank1")
    assert got["metrics"]["rollout/rank_kept_frac"] > 0.0
    if skew:
        assert rank1["metrics"]["rollout/rank_kept_frac"] == 0.0  # rank 1 had nothing to train on
    else:
        assert rank1["metrics"]["rollout/rank_kept_frac"] > 0.0
    if mode == "fsdp" and skew:  # rank 1 joined each of rank 0's micro-batches' collectives with a zero-weight one
        assert rank1["metrics"]["train/pad_micro_batches"] == got["metrics"]["train/micro_batches"] > 0
        assert got["metrics"]["train/pad_micro_batches"] == 0

    cfg, model, opt, sched = one_update_setup()
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    sampler = FixedSampler(make_rollout(seed=FIXED_ROLLOUT_SEED, rank_skew=skew))
    metrics, _ = run_step(cfg, sampler, PolicyUpdate(cfg, model, opt, sched), list(range(PROMPTS)), 0)
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    assert expected.abs().max() > 0
    assert (got["update"] - expected).abs().max() <= DP_RTOL * expected.abs().max()
    assert got["metrics"]["rollout/kept_frac"] == metrics["rollout/kept_frac"]  # global metrics are all-reduced


def test_two_process_run_finishes_resumes_and_logs_once(tmp_path):
    model_dir = save_tiny_dash_model(tmp_path / "model", seed=1)
    out = tmp_path / "run"
    first = _torchrun("train", model_dir, out, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun("train", model_dir, out, 3, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "time/step_s" in x]
    assert steps == [1, 2, 3]  # rank 0 alone logs; the resumed run continues at step 3
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-3"


def _final_weights(ckpt):
    """A sharded checkpoint's weights loaded into a plain model in this process (no process group)."""
    from dash.rl.checkpoint import load_sharded
    from dash.rl.warmstart import build_tiny_model

    model = build_tiny_model(seed=2)
    load_sharded(ckpt, model)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_fsdp_run_resumes_exactly_from_sharded_checkpoint_and_on_one_process(tmp_path):
    from dash.cli import main
    from tests.rl.ddp_worker import train_args

    model_dir = save_tiny_dash_model(tmp_path / "model", seed=1)
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    for args in [(model_dir, resumed, 2), (model_dir, resumed, 3, "--resume"), (model_dir, straight, 3)]:
        proc = _torchrun("train", *args, "--fsdp")
        assert proc.returncode == 0, proc.stderr[-3000:]
    step3 = resumed / "checkpoints" / "step-3"
    assert sorted(p.name for p in (step3 / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step3 / "model").exists()  # sharded: no rank ever gathers the full state
    # gloo's reductions are deterministic and the checkpoint restores weights, AdamW moments, data position and RNG
    assert torch.equal(_final_weights(step3), _final_weights(straight / "checkpoints" / "step-3"))

    # DCP reshards on load: the 2-rank checkpoint resumes in this single process (for one more step: a changed config,
    # which resume reports)
    with pytest.warns(UserWarning, match=r"train\.steps \(3 -> 4\)"):
        assert main(train_args(str(model_dir), str(resumed), "4", resume=True, fsdp=True)) == 0
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()
             if "time/step_s" in x]
    assert steps == [1, 2, 3, 4]
    assert not torch.equal(_final_weights(resumed / "checkpoints" / "step-4"), _final_weights(step3))


_BACKEND_SCRIPT = """
import sys, torch, torch.distributed as dist
from dash.rl.distributed import DistInfo, all_reduce_sum
backend = sys.argv[1]
dist.init_process_group(backend=backend, init_method="file://" + sys.argv[2], rank=0, world_size=1)
try:
    print("SUM", all_reduce_sum([1.0, 2.5], DistInfo(0, 2, 0)))  # world 2 in DistInfo: takes the collective path
except RuntimeError as exc:
    print("ERROR", str(exc).splitlines()[0])
dist.destroy_process_group()
"""


def test_cuda_process_group_keeps_a_cpu_backend_for_the_step_counts(tmp_path):
    """The step's counts are all-reduced as CPU tensors; an nccl-only group (CUDA tensors only) rejects that, so on
    CUDA the group is "cpu:gloo,cuda:nccl". No nccl in this torch: gloo stands in for nccl under the same device
    map, which keeps the behaviour under test (which backend serves CPU tensors)."""
    from dash.rl.distributed import process_group_backend

    assert process_group_backend(torch.device("cpu")) == "gloo"
    spec = process_group_backend(torch.device("cuda"))
    assert spec == "cpu:gloo,cuda:nccl"
    outputs = {}
    for name, backend in (("ours", spec.replace("nccl", "gloo")), ("cuda only", "cuda:gloo")):
        proc = subprocess.run([sys.executable, "-c", _BACKEND_SCRIPT, backend, str(tmp_path / name.replace(" ", "_"))],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[name] = proc.stdout
    assert "SUM [1.0, 2.5]" in outputs["ours"]
    assert "ERROR" in outputs["cuda only"]  # what an nccl-only group did to every training step
