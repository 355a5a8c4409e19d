"""Random models of the presets' shape for the GPU benchmarks (sampler.py --gpu, decode_step.py, step_time.py
--random-model): no download, so they run on the offline GPU machine of `make gpu-check`.

`write_model(folder, "qwen2.5-0.5b")` saves a randomly initialised Qwen2.5-0.5B-shaped model (24 layers, hidden
896, 14 query / 2 KV heads, intermediate 4864, vocabulary 151936) as an HF folder that both dash (`load_model`) and
transformers read, with a character-level tokenizer that gives every one of the vocabulary's ids a character (the
arithmetic task's characters first), so a trainer run on the arith task encodes its prompts and decodes every
sampled token. "tiny" is the same layout at a CPU size (GQA group 7 as the 0.5B model) for the dry runs.
Speed depends on the shapes, not on the weights' values, so random weights time the same kernels as real ones.

`code_point_parity` is a reward a random model earns about half of the time (the parity of the completion's code
points), so groups are mixed and DASH's filter keeps a realistic share: `--data.reward=benchmarks/random_qwen.py:
code_point_parity`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dash.model_io import save_model
from dash.rl.warmstart import build_tiny_model
from dash.tasks.arith import ARITH_ALPHABET, TINY_MODEL_CONFIG
from dash.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

SHAPES = {
    "qwen2.5-0.5b": {**TINY_MODEL_CONFIG, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "max_window_layers": 24, "rope_theta": 1_000_000.0,
                     "initializer_range": 0.02,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    # CPU dry runs: GQA group 7 with head dim 16, a vocabulary that no block size divides
    "tiny": {**TINY_MODEL_CONFIG, "vocab_size": 997, "hidden_size": 112, "intermediate_size": 256,
             "num_hidden_layers": 2, "num_attention_heads": 7, "num_key_value_heads": 1,
             "max_position_embeddings": 2048, "max_window_layers": 2, "initializer_range": 0.02},
}
_FIRST_EXTRA_CODEPOINT = 0x100  # past Latin-1, so no extra character collides with the task's alphabet
_SURROGATES = range(0xD800, 0xE000)  # not characters: skipped


def full_vocab_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """dash.tokenizer's character-level layout (specials, then one token per character) over vocab_size ids."""
    chars, cp = list(ARITH_ALPHABET), _FIRST_EXTRA_CODEPOINT
    while len(SPECIAL_TOKENS) + len(chars) < vocab_size:
        if cp not in _SURROGATES:
            chars.append(chr(cp))
        cp += 1
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*SPECIAL_TOKENS, *chars])}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN)


def write_model(folder: str | Path, shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """The random model of SHAPES[shape] (HF init std), saved in `dtype` with the full-vocabulary tokenizer."""
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: expected one of {sorted(SHAPES)}")
    config = SHAPES[shape]
    model = build_tiny_model(seed=seed, config=config).to(dtype)
    return save_model(model, folder, tokenizer=full_vocab_tokenizer(config["vocab_size"]))


def code_point_parity(completion: str, answer: str) -> float:
    """1 when the completion's code points sum to an odd number: about half of a random model's samples."""
    return float(sum(map(ord, completion)) % 2)
