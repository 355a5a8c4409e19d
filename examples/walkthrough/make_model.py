"""Stand-in for "your own model": a tiny random Qwen2 folder saved by transformers, with a character tokenizer.

A real user points `--model.path` at a Hugging Face folder they already have (Qwen2.5-0.5B, ...). No model hub is
reachable from the machines this project is tested on, so the walk-through (docs/walkthrough.md) makes one of the
same architecture, small enough for two CPU cores:

    python examples/walkthrough/make_model.py --out runs/walkthrough/base
"""

from __future__ import annotations

import argparse

import torch
import transformers

from dash.tokenizer import build_char_tokenizer

ALPHABET = "0123456789+="  # the walk-through task: "12+34=" -> "46"
HIDDEN = 64  # a few hundred thousand parameters: SFT, RL, eval and export each take seconds on CPU
LAYERS = 2
MAX_LENGTH = 32  # prompt (6) + answer (<= 3) + eos, with room to spare


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tokenizer = build_char_tokenizer(ALPHABET, model_max_length=MAX_LENGTH)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=3 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote a {sum(p.numel() for p in model.parameters()):,}-parameter Qwen2 model to {args.out}")


if __name__ == "__main__":
    main()
