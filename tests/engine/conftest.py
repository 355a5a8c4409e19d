"""Tiny random HF models (Llama / Qwen2 / Qwen3) and the same weights as `dash.model.CausalLM`, built once per session.

Weights are redrawn at std 0.2 (HF's 0.02 init gives near-uniform logits, where greedy ties would make a parity test
meaningless), norms at 1 + N(0, 0.1): tests/tiny_models.py.
"""

import pytest
import torch

from dash.model_io import load_model
from tests.tiny_models import random_hf_model

_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=96, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # family -> (transformers class, config on top of _BASE)
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}


def build_pair(family: str, folder, seed: int = 0):
    """(HF model, our `CausalLM` loaded from the HF checkpoint it saved at `folder`) for FAMILIES[family]."""
    hf_class, extra = FAMILIES[family]
    hf = random_hf_model(hf_class, {**_BASE, **extra}, seed)
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # parity runs compare full-length completions
    return hf, load_model(folder)


@pytest.fixture(scope="session")
def model_pair(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_pair(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def random_prompts(lengths, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def make_prompts():
    """`random_prompts` as a fixture (test modules do not import conftest)."""
    return random_prompts
