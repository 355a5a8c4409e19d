"""GRPO with TRL, the policy loss computed by dash_kernels (no [B, L, V] logits, zero-advantage rows skipped).

    .venv/bin/python examples/trl_grpo_dash.py                # ~1 minute on 2 CPU cores
    .venv/bin/python examples/trl_grpo_dash.py --steps 20 --model /path/to/hf/model/folder

Needs the optional extra: pip install "dash-rl[trl]" (trl, datasets). Without --model it builds a tiny random
Qwen2 and a word-level tokenizer in a temporary folder (no hub access needed), and rewards completions that contain
the token "t7": enough to watch the loop run, not to learn anything useful. The only dash-specific line is the
trainer class: `DashGRPOTrainer` takes exactly GRPOTrainer's arguments (or call `use_dash_loss(trainer)` on a
trainer you already have). Its loss and gradients match TRL's own (tests/kernels/test_trl_adapter.py).
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

from dash_kernels.integrations.trl import DashGRPOTrainer

TINY_VOCAB = 64


def tiny_model_folder():
    """A random 2-layer Qwen2 and its word-level tokenizer ("t0" ... "t61", "<pad>", "<eos>"), saved to a folder."""
    folder = tempfile.mkdtemp(prefix="dash_tiny_")
    vocab = {f"t{i}": i for i in range(TINY_VOCAB - 2)}
    vocab.update({"<pad>": TINY_VOCAB - 2, "<eos>": TINY_VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)
    cfg = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=TINY_VOCAB - 2, eos_token_id=TINY_VOCAB - 1)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def reward_contains_t7(completions, **kwargs):
    return [1.0 if "t7" in c.split() else 0.0 for c in completions]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: a tiny random Qwen2)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    folder = args.model or tiny_model_folder()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)  # keeps a custom tokenizer.json as is
    prompts = Dataset.from_dict({"prompt": [" ".join(f"t{(i * 7 + j) % 50}" for j in range(4)) for i in range(32)]})
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="dash_grpo_"), use_cpu=True, bf16=False,
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                        max_steps=args.steps, learning_rate=1e-4, loss_type="dapo", beta=0.0, logging_steps=1,
                        report_to="none", temperature=1.0)
    trainer = DashGRPOTrainer(model=model, reward_funcs=reward_contains_t7, args=config, train_dataset=prompts,
                              processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()
                   if k in ("step", "loss", "reward", "entropy", "clip_ratio/region_mean")})


if __name__ == "__main__":
    main()
