"""Worker for tests/rl/test_distributed.py, launched by torchrun (2 processes, gloo on CPU).

    torchrun --nproc_per_node 2 tests/rl/ddp_worker.py update OUT.pt [--fsdp] [--both-ranks-train]
    torchrun --nproc_per_node 2 tests/rl/ddp_worker.py train MODEL_DIR OUT_DIR STEPS [--resume] [--fsdp]
"""

import faulthandler
import os
import sys
from pathlib import Path

faulthandler.enable()  # a native crash (e.g. SIGABRT in c10d teardown) prints the Python stack of every thread

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.* imports

import torch  # noqa: E402


def run_update(out_path: str, fsdp: bool, skew: bool) -> None:
    from dash.rl.distributed import close_distributed, init_distributed
    from dash.rl.fsdp import gathered, shard_model
    from dash.rl.step import PolicyUpdate, run_step
    from tests.rl.test_distributed import FIXED_ROLLOUT_SEED, PROMPTS, make_cfg, one_update_setup
    from tests.rl.test_update_equivalence import FixedSampler, make_rollout

    info = init_distributed(torch.device("cpu"))
    shard = (lambda m: shard_model(m, average_grads=False)) if fsdp else None
    cfg, model, opt, sched = one_update_setup(shard)
    with gathered(model):  # FSDP: the full parameters, to diff against
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    sampler = FixedSampler(make_rollout(seed=FIXED_ROLLOUT_SEED, rank_skew=skew))
    metrics, _ = run_step(cfg, sampler, PolicyUpdate(cfg, model, opt, sched), list(range(PROMPTS)), 0, info)
    with gathered(model):
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if info.is_main:
        torch.save({"update": after - before, "metrics": metrics}, out_path)
    else:
        torch.save({"metrics": metrics}, out_path + ".rank1")
    close_distributed(info)
    assert make_cfg  # imported for the shared settings


def train_args(model_dir: str, out_dir: str, steps: str, resume: bool, fsdp: bool) -> list[str]:
    from tests.rl.test_trainer_e2e import _even_length  # noqa: F401  (registers the test reward)

    args = ["train", f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=8",
            "--data.reward=test_even_length", "--sampling.max_new_tokens=5", "--train.prompts_per_step=4",
            "--train.micro_batch_size=4", f"--train.steps={steps}", f"--log.out_dir={out_dir}", "--log.eval_every=0"]
    if resume:
        args.append(f"--resume={out_dir}")
    if fsdp:
        args.append("--train.parallel=fsdp")
    return args


def run_train(model_dir: str, out_dir: str, steps: str, resume: bool, fsdp: bool) -> None:
    from dash.cli import main

    raise SystemExit(main(train_args(model_dir, out_dir, steps, resume, fsdp)))


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    if sys.argv[1] == "update":
        run_update(sys.argv[2], "--fsdp" in sys.argv, "--both-ranks-train" not in sys.argv)
        # Outputs written and the group left: skip interpreter finalization. Under FSDP2 the gloo group and its
        # threads outlive destroy_process_group (FSDP's mesh keeps a reference; seen under gdb) and are still running
        # while Python and C++ statics tear down. One CI run of this test aborted there ("terminate called without an
        # active exception"); 190 local runs did not reproduce it. This test checks the update, not torch's teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        run_train(sys.argv[2], sys.argv[3], sys.argv[4], "--resume" in sys.argv, "--fsdp" in sys.argv)
