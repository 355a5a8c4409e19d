"""Three DASH and three GRPO optimizer steps of a random Qwen2.5-0.5B-shaped model on a CUDA device, in bf16 with
fp32 master weights (dash/rl/optim.py's MasterWeightAdamW): the sampler, the fused loss, the KL reference and the
optimizer as the paper presets run them, at the real sizes (24 layers, hidden 896, 14 / 2 heads, vocab 151936).

The tokenizer is a character-level one with a character for every one of the 151936 ids (the arithmetic task's
characters first), so every sampled token decodes to text; the reward is the parity of the completion's code
points, which a random model earns about half the time, so groups are mixed and both algorithms take real updates.
"""

import pytest
import torch

from benchmarks.random_qwen import code_point_parity, full_vocab_tokenizer
from dash.config import load_config
from dash.model_io import save_model
from dash.rewards import register_reward
from dash.rl.optim import MasterWeightAdamW
from dash.rl.trainer import Trainer
from dash.rl.warmstart import build_tiny_model
from dash.tasks.arith import TINY_MODEL_CONFIG

pytestmark = pytest.mark.cuda
QWEN25_0_5B = {**TINY_MODEL_CONFIG, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
               "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
               "max_position_embeddings": 32768, "rope_theta": 1_000_000.0, "initializer_range": 0.02,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}}
STEPS = 3

register_reward("gpu_test_parity", code_point_parity)


def write_model(folder, config: dict, seed: int = 0):
    """A random model of `config` (HF init std), saved in bf16 with the full-vocabulary tokenizer."""
    model = build_tiny_model(seed=seed, config=config).to(torch.bfloat16)
    return save_model(model, folder, tokenizer=full_vocab_tokenizer(config["vocab_size"]))


def run_steps(folder, out_dir, algorithm: str, device: str = "cuda", steps: int = STEPS):
    """`steps` optimizer steps of `algorithm` in bf16 with the KL reference; returns (trainer, metrics per step,
    fp32 masters before the first step)."""
    cfg = load_config(None, [
        f"--model.path={folder}", f"--model.device={device}", "--model.dtype=bfloat16",
        f"--train.algorithm={algorithm}", "--data.reward=gpu_test_parity", "--data.test_size=8",
        "--sampling.max_new_tokens=16", "--train.prompts_per_step=8", "--train.group_size=4",
        "--train.micro_batch_size=8", f"--train.steps={steps}", "--train.lr=1e-5", "--loss.beta=0.04",
        "--log.eval_every=0", f"--log.out_dir={out_dir}"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    before = [m.detach().clone() for m in trainer.optimizer.masters]
    metrics = [trainer.train_step() for _ in range(steps)]
    return trainer, metrics, before


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("qwen2.5-0.5b-random") / "model", QWEN25_0_5B)


@pytest.mark.parametrize("algorithm,calls_per_step", [("dash", 1), ("grpo", 4)])  # grpo: 32 samples / 8 per call
def test_three_bf16_steps_with_fp32_masters(algorithm, calls_per_step, qwen_folder, tmp_path):
    trainer, metrics, before = run_steps(qwen_folder, tmp_path / algorithm, algorithm)
    try:
        opt = trainer.optimizer
        assert isinstance(opt, MasterWeightAdamW)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in params)
        assert all(m.is_cuda and m.dtype == torch.float32 for m in opt.masters)
        for step, m in enumerate(metrics):
            assert m["rollout/sampling_calls"] == calls_per_step, (step, m)
            assert m["train/skipped_update"] == 0.0, (step, m)  # every step updated the weights
            assert 0.0 < m["train/grad_norm"] < float("inf"), (step, m)
            assert 0.0 < m["rollout/reward_mean"] < 1.0, (step, m)  # mixed groups: the advantages are not all 0
        moved = sum(int(not torch.equal(m, b)) for m, b in zip(opt.masters, before))
        assert moved == len(before), f"only {moved} of {len(before)} master tensors changed in {STEPS} steps"
        # The bf16 weights sampling and training use are the masters rounded once.
        assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(params, opt.masters))
    finally:
        trainer.close()
