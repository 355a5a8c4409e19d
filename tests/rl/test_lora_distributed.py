"""LoRA adapters under torchrun data parallel (2 processes, gloo on CPU, DDP-style replicas).

Checked on both ranks after the steps: the adapters are bitwise identical (each rank applies the same all-reduced
gradient to the same starting adapters, and the trainer seeds A's random init the same on every rank), the base
weights are bitwise unchanged (frozen, outside the optimizer and the gradient all-reduce), and the result equals one
process training on the same prompts (SGD updates element-wise; a trainer run, with AdamW, by its samples and
gradient norm: see that test's docstring). FSDP with LoRA is refused at config time (tests/rl/test_lora_train.py and
tests/bad_inputs/test_bad_user_features.py): one FSDP2 unit mixing frozen base and trainable adapter parameters,
and a sharded checkpoint in peft's adapter layout, are not built.

Tolerance against one process: DP_RTOL (1e-5 of the largest update entry), the DDP-vs-single tolerance of
tests/rl/test_distributed.py, for the same reason: the same kernels run on the same samples, and only how fp32 sums
are split differs (each rank accumulates its own samples' gradients, then the all-reduce adds the two sums), i.e.
rounding of ~1e-7 per addition. Measured here (two SGD updates at UPDATE_LR = 1 over the adapters, B started
non-zero so that A gets gradients too, both ranks training): 2.5e-7 of the largest update entry.
"""

import os
import subprocess

import pytest
import torch

from dash.config import LoRAConfig, load_config
from dash.lora import apply_lora, lora_modules
from dash.rl.step import PolicyUpdate, run_step
from tests.rl.lora_ddp_worker import lora_state
from tests.rl.test_distributed import DP_RTOL, FIXED_ROLLOUT_SEED, ROOT, TORCHRUN, UPDATE_LR, make_cfg
from tests.rl.test_trainer_e2e import _even_length  # noqa: F401  (registers the test reward)
from tests.rl.test_update_equivalence import PROMPTS, FixedSampler, make_rollout, tiny_model
from tests.tiny_models import save_tiny_dash_model

WORKER = ROOT / "tests" / "rl" / "lora_ddp_worker.py"
UPDATES = 2  # two SGD updates: the second one moves A too and starts from the first one's (rank-synced) adapters
LORA_RANK, LORA_ALPHA = 4, 8.0
LORA_INIT_SEED = 11
# B's start: non-zero (a fresh adapter's B = 0 gives A no gradient), small enough that the adapters stay a
# perturbation of the base (0.1-scale weights in tiny_model)
B_INIT_STD = 0.05
TRAIN_STEPS = 2

pytestmark = [pytest.mark.slow,  # torchrun processes, tens of seconds each
              pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to this python")]


def lora_update_setup():
    """The one-update set-up of test_distributed.py on a LoRA-wrapped tiny model: SGD over the adapters alone."""
    cfg = make_cfg()
    model = tiny_model()
    torch.manual_seed(LORA_INIT_SEED)  # A's kaiming init: the same on every rank and in the single process
    apply_lora(model, LoRAConfig(enabled=True, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0))
    g = torch.Generator().manual_seed(LORA_INIT_SEED)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * B_INIT_STD)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=UPDATE_LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return cfg, model, opt, sched


def lora_train_config(model_dir, out_dir, steps: int):
    """A trainer run with model.lora (dropout 0: a dropout mask depends on the rank's share of the batch)."""
    return load_config(None, [
        f"--model.path={model_dir}", "--model.device=cpu", "--data.test_size=8", "--data.reward=test_even_length",
        "--sampling.max_new_tokens=5", "--train.prompts_per_step=8", "--train.group_size=4",
        "--train.micro_batch_size=8", f"--train.steps={steps}", "--train.lr=1e-2", f"--log.out_dir={out_dir}",
        "--log.eval_every=0", "--model.lora.enabled=true", f"--model.lora.rank={LORA_RANK}",
        f"--model.lora.alpha={LORA_ALPHA}", "--model.lora.dropout=0.0"])


def _torchrun(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(WORKER), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ranks(out):
    return [torch.load(f"{out}.rank{r}") for r in range(2)]


def _check_ranks_synced_and_base_frozen(ranks):
    for r in ranks:
        assert r["base"].keys() == r["base0"].keys() and r["base"]
        for k in r["base"]:
            assert torch.equal(r["base"][k], r["base0"][k]), f"base weight {k} changed"
    r0, r1 = ranks
    assert r0["adapters"].keys() == r1["adapters"].keys() and r0["adapters"]
    for k in r0["adapters"]:
        assert torch.equal(r0["adapters"][k], r1["adapters"][k]), f"{k} differs between the ranks"
        assert torch.equal(r0["adapters0"][k], r1["adapters0"][k]), f"{k} started differently on the ranks"
    for kind in ("lora_A", "lora_B"):
        assert any(not torch.equal(r0["adapters"][k], r0["adapters0"][k]) for k in r0["adapters"] if kind in k), \
            f"no {kind} moved"


def _update(state):
    return torch.cat([(state["adapters"][k] - state["adapters0"][k]).reshape(-1) for k in sorted(state["adapters"])])


def test_two_process_lora_update_equals_single_process(tmp_path):
    out = tmp_path / "update.pt"
    proc = _torchrun("update", out)
    assert proc.returncode == 0, proc.stderr[-8000:]
    ranks = _ranks(out)
    _check_ranks_synced_and_base_frozen(ranks)
    assert all(m["rollout/rank_kept_frac"] > 0 for r in ranks for m in r["metrics"])  # both ranks trained

    cfg, model, opt, sched = lora_update_setup()
    adapters0, base0 = lora_state(model)
    update = PolicyUpdate(cfg, model, opt, sched)
    sampler = FixedSampler(make_rollout(seed=FIXED_ROLLOUT_SEED))
    for step in range(UPDATES):
        run_step(cfg, sampler, update, list(range(PROMPTS)), step)
    adapters, base = lora_state(model)
    expected = _update({"adapters": adapters, "adapters0": adapters0})
    assert expected.abs().max() > 0
    assert all(torch.equal(base[k], base0[k]) for k in base)
    got = _update(ranks[0])
    assert (got - expected).abs().max() <= DP_RTOL * expected.abs().max()


def test_two_process_lora_trainer_run_equals_single_process(tmp_path):
    """The trainer path: adapters built by Trainer.setup on each rank (seeded alike), the sampler with the adapters
    applied, the gradient all-reduce over the adapters alone, AdamW.

    Compared with one process: the same samples and rewards (the global reward and kept-fraction metrics are equal)
    and the same gradient (the all-reduced gradient norm within DP_RTOL: measured 1.2e-7 and 4.4e-7 relative on the
    two steps). The adapters themselves are compared element-wise by the SGD test above, not here: AdamW's
    m / (sqrt(v) + eps) divides each entry's rounding by the entry's own size, so entries whose gradient is rounding
    noise (near zero) move by up to ~lr either way (measured: 1.3e-2 of the largest update after two steps).
    """
    from dash.rl.trainer import Trainer

    model_dir = save_tiny_dash_model(tmp_path / "model", seed=1)
    out = tmp_path / "train.pt"
    proc = _torchrun("train", model_dir, tmp_path / "run2", TRAIN_STEPS, out)
    assert proc.returncode == 0, proc.stderr[-8000:]
    ranks = _ranks(out)
    _check_ranks_synced_and_base_frozen(ranks)
    assert any(all(r["metrics"][s]["rollout/rank_kept_frac"] > 0 for r in ranks) for s in range(TRAIN_STEPS)), \
        "no step where both ranks trained: the all-reduce only ever added zero"

    single = Trainer(lora_train_config(model_dir, tmp_path / "run1", TRAIN_STEPS), quiet=True)
    single.setup()
    try:
        adapters0, _ = lora_state(single.model)
        want = [single.train_step() for _ in range(TRAIN_STEPS)]
    finally:
        single.close()
    assert all(torch.equal(adapters0[k], ranks[0]["adapters0"][k]) for k in adapters0)  # the same seeded init
    for step, (w, got) in enumerate(zip(want, ranks[0]["metrics"], strict=True)):
        same = ["rollout/reward_mean", "rollout/kept_frac", "reward/failed_calls", "reward/no_reward"]  # global ones
        assert {k: got[k] for k in same} == {k: w[k] for k in same}, f"step {step + 1} sampled differently"
        assert got["train/grad_norm"] == pytest.approx(w["train/grad_norm"], rel=DP_RTOL), f"step {step + 1}"
