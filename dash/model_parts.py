"""The pieces of `dash.model` that every decoder family shares and that hold no family's layout: RMSNorm, the RoPE
tables, fp32 logits, and what the sampler keeps per layer for one call (`LayerState`, `fold_lora`).

Why a separate file: `dash/model.py` is the one file a model family is written in (its modules, its parameter names,
its `LAYER_WEIGHT_PATHS` for the sampler's layer op); what is here does not change with the family.
The RoPE inverse frequencies are a plain fp32 attribute, not a buffer, so they never appear in the state dict and
`model.to(torch.bfloat16)` cannot round them.
Tests: `.venv/bin/python -m pytest tests/model -q` (parity with HF), tests/engine (the sampler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dash.model_config import ModelConfig
from dash_kernels.decoder_layer import LAYER_WEIGHTS, pack_layer
from dash_kernels.rms_norm import rms_norm_ref
from dash_kernels.rotary import rotary_ref

_LOGITS_ROW_BLOCK = 8192  # vocabulary rows upcast at a time by logits_fp32 on CPU (32 MiB at H = 1024)
Adapter = tuple[torch.Tensor, torch.Tensor, float]  # LoRA (A [r, in], B [out, r], scaling), as dash.lora lists them


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back before the weight (HF's order, so bf16 matches HF)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos / sin tables for given positions. Holds no parameters and no buffers (see module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._inv_freq = config.rope_inv_freq()  # [D/2] fp32, on CPU until first use

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) long -> (cos, sin), each (T, D) fp32."""
        if self._inv_freq.device != positions.device:  # moved once, then cached on the model's device
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]: HF's "rotate half" layout, not interleaved pairs
        return emb.cos(), emb.sin()


# HF's "rotate half" RoPE, out of place; dash_kernels keeps the one definition (its C++ in-place kernel for the
# sampler is tested against it).
apply_rope = rotary_ref


def logits_fp32(hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """hidden: (..., H), w: the lm_head (V, H) -> fp32 logits (..., V), accumulated in fp32 and never rounded to a
    bf16 / fp16 model's dtype: what the sampler draws from, so its log-probs match the trainer's fused kernel (fp32
    accumulators). Rounding logits to bf16 first would move them by up to 2^-8 of their size (0.06 nats at 16)."""
    if hidden.dtype == torch.float32 and w.dtype == torch.float32:
        return F.linear(hidden, w)
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    if flat.is_cuda:  # cuBLAS: bf16 / fp16 operands, fp32 output (not run here: no GPU)
        out = torch.mm(flat, w.t(), out_dtype=torch.float32)
    else:  # no such CPU kernel: upcast the weight a block of rows at a time (bounded extra memory)
        x = flat.float()
        out = torch.cat([F.linear(x, w[i: i + _LOGITS_ROW_BLOCK].float())
                         for i in range(0, w.shape[0], _LOGITS_ROW_BLOCK)], dim=1)
    return out.view(*hidden.shape[:-1], w.shape[0])


@dataclass(slots=True)
class LayerState:
    """A decoder layer's tensors for one sampler call, built by `dash.model.DecoderLayer.paged_state` (the weights
    cannot change within a call, so they are gathered and packed once per call, never kept past it).

    Attributes:
        weights: the layer's Parameters themselves in LAYER_WEIGHTS order (None: absent slot).
        lora: LoRA adapters in the same order, None per unadapted slot; None: the layer has none.
        packed: the projections packed for the C++ op's GEMMs (dash_kernels.decoder_layer.pack_layer) with the
            adapters folded in; None: torch's GEMMs read `weights` (and `lora` beside them).
        k_cache, v_cache: the layer's K / V pages [num_pages, page_size, Hkv, D].
    """

    weights: list[torch.Tensor | None]
    lora: list[Adapter | None] | None
    packed: list[torch.Tensor] | None
    k_cache: torch.Tensor
    v_cache: torch.Tensor


def merged_weight(weight: torch.Tensor, adapter: Adapter | None) -> torch.Tensor:
    """W + scaling * B @ A ([out, in], a new tensor) for a packed or exported layer; W itself when no adapter."""
    if adapter is None:
        return weight
    A, B, scaling = adapter
    return torch.addmm(weight, B, A, alpha=scaling)  # [out, in]


def fold_lora(weights: list[torch.Tensor | None], lora: list[Adapter | None]) -> list[torch.Tensor | None]:
    """A layer's slots with each adapted W replaced by merged_weight (for packing); the other slots are the tensors
    themselves. The same layer as the adapter beside W (tests/engine/test_lora_sampler.py)."""
    return [merged_weight(w, a) for w, a in zip(weights, lora, strict=True)]


def weight_slots(layer: nn.Module, paths: dict[str, str]) -> list[torch.Tensor | None]:
    """The tensors of the sampler's layer op, in its LAYER_WEIGHTS order, read from `layer` at `paths` (slot name ->
    dotted attribute path, as dash.model.LAYER_WEIGHT_PATHS); a path through an absent module or a bias=False
    projection gives None. The objects themselves: an in-place optimizer step is what the sampler reads next."""
    out = []
    for name in LAYER_WEIGHTS:
        obj = layer
        for attr in paths[name].split("."):
            obj = None if obj is None else getattr(obj, attr)
        out.append(obj)
    return out


def layer_state(weights: list[torch.Tensor | None], lora: list[Adapter | None] | None, pack: bool,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> LayerState:
    """A layer's LayerState for one call; pack: also pack its projections for the C++ op's AVX-512 GEMMs, with the
    adapters folded in (one layer's merged weights exist at a time)."""
    packed = pack_layer(weights if lora is None else fold_lora(weights, lora)) if pack else None
    return LayerState(weights, lora, packed, k_cache, v_cache)
