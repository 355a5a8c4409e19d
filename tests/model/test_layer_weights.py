"""The sampler's layer op reads a DecoderLayer's own Parameters, listed from one declaration.

`dash_kernels.decoder_layer.LAYER_WEIGHTS` / `PACKED_WEIGHTS` name the op's slots in order (beside its C++ schema);
`dash.model.LAYER_WEIGHT_PATHS` says where a DecoderLayer keeps each. These tests fail when the C++ enums and the
Python order drift apart, when a family adds a parameter that no slot lists (the sampler would silently ignore it),
or when a slot reads a copy instead of the Parameter (the sampler would miss an optimizer step).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dash.model import LAYER_WEIGHT_PATHS, DecoderLayer, ModelConfig
from dash_kernels.decoder_layer import LAYER_WEIGHTS, PACKED_WEIGHTS

CSRC = Path(__file__).resolve().parents[2] / "csrc"
_OPTIONAL = {"q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"}
# Llama (no biases), Qwen2 (q/k/v biases), Qwen3 (q/k norm), Llama with attention_bias (q/k/v and o biases).
VARIANTS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=24),
    "llama-biases": dict(model_type="llama", attention_bias=True),
}


def _cpp_enum(name: str) -> list[str]:
    """The enumerators of `enum <name>` in csrc/ (wherever the op's source lives), in order."""
    pattern = re.compile(r"enum\s+" + name + r"\b[^{]*\{([^}]*)\}", re.S)
    for path in sorted(CSRC.rglob("*.[ch]*")):
        found = pattern.search(path.read_text())
        if found:
            body = re.sub(r"//[^\n]*", "", found.group(1))
            return [e.split("=")[0].strip() for e in body.split(",") if e.strip()]
    raise AssertionError(f"enum {name} not found under {CSRC}")


def _camel(slot: str) -> str:
    return "".join(part.capitalize() for part in slot.split("_"))


def test_python_slot_orders_equal_the_cpp_enums():
    layer = _cpp_enum("LayerWeight")
    assert layer[: len(LAYER_WEIGHTS)] == ["k" + _camel(s) for s in LAYER_WEIGHTS]
    assert layer[len(LAYER_WEIGHTS):] in ([], ["kNumWeights"])  # at most the count after the slots
    packed = _cpp_enum("PackedWeight")
    assert packed[: len(PACKED_WEIGHTS)] == ["kPacked" + _camel(s) for s in PACKED_WEIGHTS]
    assert packed[len(PACKED_WEIGHTS):] in ([], ["kNumPacked"])


def test_every_slot_has_exactly_one_path():
    """The paths are looked up by slot name (their order is LAYER_WEIGHTS'): no missing, no unknown name."""
    assert set(LAYER_WEIGHT_PATHS) == set(LAYER_WEIGHTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weight_slots_are_the_layers_parameters_each_once(variant):
    config = ModelConfig(**dict(vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
                         **VARIANTS[variant])
    layer = DecoderLayer(config)
    slots = layer.weight_slots()
    assert len(slots) == len(LAYER_WEIGHTS)
    params = dict(layer.named_parameters())
    by_id = {id(p): name for name, p in params.items()}
    listed = [by_id[id(t)] for t in slots if t is not None]  # KeyError: a slot that is not one of the Parameters
    assert sorted(listed) == sorted(params), "a Parameter no slot lists, or one listed twice"
    for name, t in zip(LAYER_WEIGHTS, slots):
        assert t is not None or name in _OPTIONAL, f"{variant}: required slot {name} is None"
    # The slots follow the Parameters: an in-place update (an optimizer step) is what the sampler reads next.
    with torch.no_grad():
        layer.mlp.down_proj.weight.add_(1.0)
    assert layer.weight_slots()[LAYER_WEIGHTS.index("down")] is layer.mlp.down_proj.weight
