"""The tiny random models the tests build, in one place: HF models of each family, and a dash model folder to train.

- `random_hf_model`: a transformers model (Llama / Qwen2 / Qwen3 ...) of a caller's tiny config, fp32, eval mode,
  eager attention (the plainest reference), with every weight re-drawn: HF's own init (std 0.02, zero biases, unit
  norms) gives near-uniform logits, where greedy ties make a parity test meaningless and a dropped bias, norm or RoPE
  term changes nothing visible. Weights at std WEIGHT_STD and norms at 1 + N(0, NORM_JITTER) move the logits by O(1).
  tests/model/conftest.py (parity, checkpoint I/O) and tests/engine/conftest.py (sampler vs HF generate) build theirs
  here; each keeps its own sizes.
- `save_tiny_dash_model`: `dash.rl.warmstart.build_tiny_model` (untrained) with the arithmetic tokenizer, saved as
  an HF folder: what `--model.path` of a training run in tests/rl needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dash.model_io import save_model
from dash.rl.warmstart import build_tiny_model
from dash.tokenizer import build_arith_tokenizer

WEIGHT_STD = 0.2  # logits come out with std ~1-2: large enough to expose a wrong term, small enough for fp32
NORM_JITTER = 0.1  # norm weights 1 + N(0, 0.1): a norm applied on the wrong axis, or missing, is visible


def random_hf_model(hf_class: str, config: dict, seed: int = 0) -> torch.nn.Module:
    """A random fp32 eval-mode `transformers.<hf_class>` (e.g. "Qwen2ForCausalLM") built from `config` (its config
    class's kwargs), eager attention, weights re-drawn as the module docstring says (seeded by `seed`)."""
    # transformers takes seconds to import: the tests that only need save_tiny_dash_model do not pay for it
    import transformers

    cls = getattr(transformers, hf_class)
    hf_config = cls.config_class(**config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + NORM_JITTER * torch.randn_like(p) if "norm" in name else WEIGHT_STD * torch.randn_like(p))
    return model


def save_tiny_dash_model(folder: Path, seed: int) -> Path:
    """The untrained tiny model of `seed` and the arithmetic tokenizer, saved at `folder` (returned)."""
    return save_model(build_tiny_model(seed=seed), folder, tokenizer=build_arith_tokenizer())
