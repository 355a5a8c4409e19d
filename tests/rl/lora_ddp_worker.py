"""Worker for tests/rl/test_lora_distributed.py: LoRA under torchrun data parallel (2 processes, gloo on CPU).

    torchrun --nproc_per_node 2 tests/rl/lora_ddp_worker.py update OUT.pt
    torchrun --nproc_per_node 2 tests/rl/lora_ddp_worker.py train MODEL_DIR OUT_DIR STEPS OUT.pt

Every rank writes its own result (OUT.pt.rank<r>): the test compares the ranks with each other and with one process.
"""

import faulthandler
import os
import sys
from pathlib import Path

faulthandler.enable()  # a native crash prints the Python stack of every thread

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests.* imports

import torch  # noqa: E402


def lora_state(model) -> tuple[dict, dict]:
    """(adapter tensors, base tensors) of a LoRA model, detached copies keyed by state-dict name."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ({k: v for k, v in state.items() if "lora_" in k}, {k: v for k, v in state.items() if "lora_" not in k})


def run_update(out_path: str) -> None:
    from dash.rl.distributed import close_distributed, init_distributed
    from dash.rl.step import PolicyUpdate, run_step
    from tests.rl.test_lora_distributed import UPDATES, lora_update_setup
    from tests.rl.test_update_equivalence import PROMPTS, FixedSampler, make_rollout
    from tests.rl.test_distributed import FIXED_ROLLOUT_SEED

    info = init_distributed(torch.device("cpu"))
    cfg, model, opt, sched = lora_update_setup()
    adapters0, base0 = lora_state(model)
    sampler = FixedSampler(make_rollout(seed=FIXED_ROLLOUT_SEED))
    update = PolicyUpdate(cfg, model, opt, sched)
    metrics = [run_step(cfg, sampler, update, list(range(PROMPTS)), step, info)[0] for step in range(UPDATES)]
    adapters, base = lora_state(model)
    torch.save({"adapters0": adapters0, "adapters": adapters, "base0": base0, "base": base, "metrics": metrics},
               f"{out_path}.rank{info.rank}")
    close_distributed(info)


def run_train(model_dir: str, out_dir: str, steps: str, out_path: str) -> None:
    from dash.rl.trainer import Trainer
    from tests.rl.test_lora_distributed import lora_train_config

    trainer = Trainer(lora_train_config(model_dir, out_dir, int(steps)), quiet=True)
    trainer.setup()
    adapters0, base0 = lora_state(trainer.model)
    metrics = [trainer.train_step() for _ in range(int(steps))]
    adapters, base = lora_state(trainer.model)
    torch.save({"adapters0": adapters0, "adapters": adapters, "base0": base0, "base": base, "metrics": metrics},
               f"{out_path}.rank{trainer.dist.rank}")
    trainer.close()


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks on a small machine
    if sys.argv[1] == "update":
        run_update(sys.argv[2])
    else:
        run_train(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # outputs written and the group left; see tests/rl/ddp_worker.py on gloo teardown aborts
