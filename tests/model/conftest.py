"""Shared fixtures for tests/model: tiny random HF models of each family, saved as HF checkpoints.

Every spec is small (hidden 64, 2 layers, vocab ~100) so the whole directory runs in well under a minute on 2 cores.
Weights are re-drawn with a larger scale than HF's init (tests/tiny_models.py) so that biases, norm weights and RoPE
all move the logits by O(1): a parity test on HF's init would pass even with a bias dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_models import random_hf_model


@dataclass(frozen=True)
class Spec:
    """One tiny HF model: its class name in transformers and the config kwargs."""

    hf_class: str
    config: dict[str, Any] = field(default_factory=dict)


_BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

SPECS: dict[str, Spec] = {
    "llama": Spec("LlamaForCausalLM", dict(_BASE, tie_word_embeddings=False)),
    # original context 64 puts the llama3 band edges at wavelengths 16 and 64, so at D=16, theta=5e5 (wavelengths
    # 6.3, 33, 168, ...) all three bands occur: kept, smoothed, divided by `factor`.
    "llama3_rope": Spec("LlamaForCausalLM", dict(_BASE, tie_word_embeddings=True, attention_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_tied": Spec("Qwen2ForCausalLM", dict(_BASE, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_untied": Spec("Qwen2ForCausalLM", dict(_BASE, tie_word_embeddings=False, rope_theta=1e6)),
    # head_dim 32 != 64 / 4: catches any code that derives head_dim from hidden_size.
    "qwen3": Spec("Qwen3ForCausalLM", dict(_BASE, head_dim=32, tie_word_embeddings=False)),
}


def build_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A random fp32 eval-mode HF model for SPECS[name], with eager attention (the plainest reference)."""
    return random_hf_model(SPECS[name].hf_class, SPECS[name].config, seed)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (hf_model, folder written by save_pretrained); built once per session per spec."""
    cache: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(name: str) -> tuple[torch.nn.Module, Path]:
        if name not in cache:
            model = build_hf_model(name)
            folder = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(folder)
            cache[name] = (model, folder)
        return cache[name]

    return get


def packed_batch(vocab_size: int, lengths: list[int], seed: int = 0):
    """Random sequences in both layouts.

    Returns:
        ids: (T,) packed tokens; cu_seqlens: (B+1,) int32; positions: (T,);
        padded: (B, Lmax) right-padded with token 0; mask: (B, Lmax) long, 1 at real tokens.
    """
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for b, s in enumerate(seqs):
        padded[b, : len(s)] = s
        mask[b, : len(s)] = 1
    return ids, cu_seqlens, positions, padded, mask


def pytest_generate_tests(metafunc):
    """Any test taking `spec_name` runs once per model spec."""
    if "spec_name" in metafunc.fixturenames:
        metafunc.parametrize("spec_name", list(SPECS))


@pytest.fixture
def make_batch():
    """The `packed_batch` helper as a fixture (test modules do not import conftest)."""
    return packed_batch
