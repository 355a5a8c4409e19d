"""`ModelConfig`: parse and validate an HF `config.json` for the Llama / Qwen2 / Qwen2.5 / Qwen3 family.

Reads both the transformers 4.x `rope_theta` / `rope_scaling` keys and the 5.x `rope_parameters` dict, and writes
both spellings (only 5.24 is installed and tested here). Unsupported features (sliding window, other activations,
MLP biases, partial rotary) are errors naming the field, raised before any weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# model_type -> the HF class named in config.json "architectures" (what AutoModelForCausalLM instantiates).
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Without these the parameter shapes are unknown; every other field has HF's default.
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# HF's per-family defaults (transformers 5.24 config classes) for fields a config.json may omit.
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "qwen2": 32768, "qwen3": 32768}
_QWEN3_HEAD_DIM_DEFAULT = 128
_ROPE_THETA_DEFAULT = 10000.0
_RMS_EPS_DEFAULT = 1e-6
_LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The subset of an HF config.json that fixes a Llama / Qwen2 / Qwen3 model. Validated on construction."""

    model_type: str
    """"llama", "qwen2" (also Qwen2.5) or "qwen3"."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    """GQA key/value heads; None -> num_attention_heads."""
    head_dim: int | None = None
    """None -> hidden_size // num_attention_heads. Qwen3 sets it explicitly, often != that."""
    rms_norm_eps: float = _RMS_EPS_DEFAULT
    rope_theta: float = _ROPE_THETA_DEFAULT
    rope_scaling: dict[str, Any] | None = None
    """None (plain RoPE) or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}. A dict with rope_type "default" is normalised to None."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix (Qwen2.5-0.5B, the tiny demo model)."""
    attention_bias: bool | None = None
    """Biases on q/k/v (and on o_proj for llama / qwen3). None -> the family's value (True only for qwen2)."""
    qk_norm: bool | None = None
    """RMSNorm of each q / k head before RoPE. None -> the family's value (True only for qwen3)."""
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in _ARCHITECTURES:
            raise ValueError(f"model_type={self.model_type!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in _REQUIRED_FIELDS + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        # HF's classes hard-wire these per family, so another value would give a checkpoint HF cannot load.
        family_bias, family_qk_norm = self.model_type == "qwen2", self.model_type == "qwen3"
        if self.attention_bias is None:
            self.attention_bias = family_bias
        if self.qk_norm is None:
            self.qk_norm = family_qk_norm
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("attention_bias=False is impossible for model_type='qwen2' "
                             "(HF Qwen2 always has q/k/v biases)")
        if self.qk_norm != family_qk_norm:
            raise ValueError(f"qk_norm={self.qk_norm} does not match model_type={self.model_type!r} "
                             "(only qwen3 normalises q/k)")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    @property
    def o_proj_bias(self) -> bool:
        """HF Qwen2 puts biases on q/k/v only; Llama and Qwen3 `attention_bias` covers o_proj too."""
        return bool(self.attention_bias) and self.model_type != "qwen2"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse an HF config.json dict. Any problem -> one ValueError naming `source` and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in _ARCHITECTURES:
            what = "missing field 'model_type'" if model_type is None else f"model_type={model_type!r} is not supported"
            raise ValueError(f"{source}: {what} (supported: {sorted(_ARCHITECTURES)})")
        missing = [k for k in _REQUIRED_FIELDS if d.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing} for model_type={model_type!r}")
        unsupported = {
            "hidden_act": d.get("hidden_act", "silu") != "silu",  # SwiGLU only
            "mlp_bias": bool(d.get("mlp_bias", False)),
            "use_sliding_window": bool(d.get("use_sliding_window", False)),
            "partial_rotary_factor": d.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0),
            "layer_types": any(t != "full_attention" for t in d.get("layer_types") or ()),  # sliding-window layers
        }
        for key, bad in unsupported.items():
            if bad:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by dash.model")
        # transformers 5 reads `rope_scaling` first, then `rope_parameters` (its own format); 4.x only the former.
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        rope_theta = d.get("rope_theta", _ROPE_THETA_DEFAULT)
        if isinstance(rope, dict):
            if any(isinstance(v, dict) for v in rope.values()):
                raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
            rope_theta = rope.get("rope_theta", rope_theta)
            rope = {k: v for k, v in rope.items() if k != "rope_theta"}
        try:
            return cls(
                model_type=model_type,
                **{k: d[k] for k in _REQUIRED_FIELDS},
                num_key_value_heads=d.get("num_key_value_heads"),
                head_dim=d.get("head_dim") or (_QWEN3_HEAD_DIM_DEFAULT if model_type == "qwen3" else None),
                rms_norm_eps=d.get("rms_norm_eps", _RMS_EPS_DEFAULT),
                rope_theta=rope_theta,
                rope_scaling=rope,
                max_position_embeddings=d.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[model_type],
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A config.json dict that transformers 4.x and 5.x load as the same architecture."""
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            **{k: getattr(self, k) for k in _REQUIRED_FIELDS},
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,  # 4.x keys ...
            "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta},  # ... 5.x
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
        }
        if self.model_type != "qwen2":  # qwen2 has no such knob: its biases are fixed
            d["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            d["mlp_bias"] = False
        else:
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        if dtype is not None:
            d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")  # 5.x / 4.x spelling
        return d

    def rope_inv_freq(self) -> torch.Tensor:
        """(head_dim / 2,) fp32 RoPE inverse frequencies on CPU, with llama3 scaling when configured (HF's maths)."""
        D = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
        if self.rope_scaling is None:
            return inv_freq
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
        s = self.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq  # [D/2]
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)


def _check_rope_scaling(rope_scaling: Any, max_positions: int) -> dict[str, Any] | None:
    """Normalise rope_scaling to None (plain RoPE) or a complete llama3 dict; ValueError naming the field."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or null, got {rope_scaling!r}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (supported: 'default', 'llama3')")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for key in _LLAMA3_ROPE_FIELDS:
        value = rope_scaling.get(key, max_positions if key == "original_max_position_embeddings" else None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"rope_scaling.{key} must be a positive number for llama3 RoPE, got {value!r}")
        out[key] = value
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError("rope_scaling.high_freq_factor must exceed rope_scaling.low_freq_factor")
    return out
