"""The Llama / Qwen2 / Qwen2.5 / Qwen3 decoder family in plain torch: one module for training and sampling.

Architecture (all three families): token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> lm_head (tied to the embedding or not). Family differences
are config flags: Qwen2 has q/k/v biases, Qwen3 normalises each query / key head (RMSNorm over head_dim) before RoPE
and may have head_dim != hidden_size / num_attention_heads.

Submodule names equal HF's, so `state_dict()` keys are exactly the tensor names of an HF safetensors checkpoint
(`model.layers.0.self_attn.q_proj.weight`, ...). With tied embeddings there is no `lm_head` module at all, which is
also what HF writes to disk. Family-independent pieces (RMSNorm, RoPE tables, fp32 logits) are in dash/model_parts.py.

Entry points:
- `forward_packed(input_ids[T], cu_seqlens[B+1], positions[T], shared=None) -> hidden[T, H]`: training. Sequences
  are packed end to end (with `shared`, the samples of one prompt share its rows: dash.attention.SharedPrompts); the
  lm_head is NOT applied (dash_kernels fuses it with the log-prob so [T, V] logits never exist).
- `forward(input_ids[B, L], attention_mask[B, L]) -> logits[B, L, V]`: padded convenience for evals and tests.
- `paged_forward(input_ids[T], ctx) -> hidden[R, H]`: the sampler's step on its paged KV cache (ctx: a
  dash.engine.runner.StepContext). Each layer is one op of dash_kernels.decoder_layer (C++ on fp32 CPU, else its
  chain of kernels) over the layer's own Parameters, listed by `LAYER_WEIGHT_PATHS` in the op's `LAYER_WEIGHTS` order.

Departures from HF: padded `forward` takes positions from the mask (so left padding is handled like HF `generate`
does), and logits at pad positions are the lm_head of a zero vector (meaningless, as in HF). `ModelConfig`
(dash/model_config.py) parses, validates and writes an HF `config.json`.
Tests: `.venv/bin/python -m pytest tests/model tests/engine -q`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dash.attention import SharedPrompts, varlen_attention
from dash.model_config import ModelConfig
from dash.model_parts import (LayerState, RMSNorm, RotaryEmbedding, apply_rope, layer_state, logits_fp32,
                              weight_slots)
from dash_kernels.decoder_layer import decoder_layer_, decoder_layer_ref
from dash_kernels.rms_norm import rms_norm

if TYPE_CHECKING:  # the sampler's per-step context; the engine uses this module, never the other way round
    from dash.engine.runner import StepContext

__all__ = ["ModelConfig", "CausalLM", "Attention", "RMSNorm", "RotaryEmbedding", "apply_rope", "LAYER_WEIGHT_PATHS"]
# Where a DecoderLayer keeps each tensor of the sampler's layer op, by the op's slot name (the op fixes the order, in
# dash_kernels.decoder_layer.LAYER_WEIGHTS beside its C++ schema): the one tie between this model's modules and that
# op. A path through an absent module (q_norm without qk_norm) or parameter (a bias=False projection) gives None.
LAYER_WEIGHT_PATHS = {
    "input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight", "q_bias": "self_attn.q_proj.bias", "k": "self_attn.k_proj.weight",
    "k_bias": "self_attn.k_proj.bias", "v": "self_attn.v_proj.weight", "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight", "o": "self_attn.o_proj.weight",
    "o_bias": "self_attn.o_proj.bias", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}


class Attention(nn.Module):
    """GQA self-attention: `project_qkv` + `varlen_attention` + `o_proj`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = D
        self.scale = D**-0.5
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3: one RMSNorm over head_dim shared by all heads, applied before RoPE
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, H) normed hidden; cos/sin: (T, D) -> q (T, Hq, D), k (T, Hkv, D) with q/k norm and RoPE, v."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
        shared: SharedPrompts | None = None,
    ) -> torch.Tensor:
        """Packed path. x: (T, H) -> (T, H). With `shared`, attention runs on its layout (see SharedPrompts)."""
        q, k, v = self.project_qkv(x, cos, sin)
        if shared is None:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.scale)  # [T, Hq, D]
        else:
            e = shared.expand
            out = varlen_attention(q[e], k[e], v[e], cu_seqlens, max_seqlen, self.scale)[shared.select]  # [T, Hq, D]
        return self.o_proj(out.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); no biases in any of the three families."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H, I = config.hidden_size, config.intermediate_size  # noqa: E741 - I is the usual name for the MLP width
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
        shared: SharedPrompts | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, shared)
        return x + self.mlp(self.post_attention_layernorm(x))

    def weight_slots(self) -> list[torch.Tensor | None]:
        """The layer's Parameters themselves (no copies) in LAYER_WEIGHTS order, None for an absent slot."""
        return weight_slots(self, LAYER_WEIGHT_PATHS)

    def paged_state(self, k_cache: torch.Tensor, v_cache: torch.Tensor, lora: list | None, pack: bool) -> LayerState:
        """This layer's tensors for one sampler call (see LayerState); lora: dash.lora.layer_adapters(self)."""
        return layer_state(self.weight_slots(), lora, pack, k_cache, v_cache)

    def paged_forward(self, x: torch.Tensor, ctx: StepContext, state: LayerState) -> None:
        """x [T, H] <- this layer's output, in place, for one sampler step. Attention reads the pages after storing
        the step's K/V (`decoder_layer_`: the C++ op on fp32 CPU), or, for a step without page tables, the K/V just
        computed (`decoder_layer_ref` with the context's fresh attention)."""
        eps = self.input_layernorm.eps
        if ctx.paged:
            # The allocator made the slots (in range by construction): no range check, which on CUDA would sync.
            decoder_layer_(x, state.weights, eps, ctx.cos, ctx.sin, state.k_cache, state.v_cache, ctx.slot_mapping,
                           ctx.page_table, ctx.context_lens, ctx.cu_seqlens, self.self_attn.scale,
                           max_q_len=ctx.max_q_len, check_slots=False, packed=state.packed, lora=state.lora)
        else:
            decoder_layer_ref(x, state.weights, eps, ctx.cos, ctx.sin, ctx.fresh_attention(state), state.lora)


class DecoderModel(nn.Module):
    """HF's inner `model`: embed_tokens, layers, norm (+ the parameter-free rotary tables)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class CausalLM(nn.Module):
    """Decoder-only LM whose parameter names match the HF checkpoint (see module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        # Tied: no module, so the state dict has no duplicate and equals what HF saves.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, False)
        # Recompute each decoder layer in backward instead of keeping its activations (train.gradient_checkpointing).
        self.gradient_checkpointing = False

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output projection: the embedding matrix when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., H) -> logits (..., V). Materialises V columns: for evals and tests, not for training."""
        return F.linear(hidden, self.lm_head_weight)

    def compute_logits_fp32(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., H) -> fp32 logits (..., V): what the sampler draws from (see dash.model_parts.logits_fp32)."""
        return logits_fp32(hidden, self.lm_head_weight)

    def forward_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, positions: torch.Tensor,
                       max_seqlen: int | None = None, shared: SharedPrompts | None = None) -> torch.Tensor:
        """Run packed sequences, return the final-normed hidden states (no lm_head).

        Args:
            input_ids: (T,) long, all sequences concatenated.
            cu_seqlens: (B+1,) int32 cumulative lengths starting at 0 and ending at T (with `shared`: of the
                attention layout, ending at T_att).
            positions: (T,) long RoPE position of each token (usually 0..len-1 within each sequence).
            max_seqlen: longest sequence; computed from cu_seqlens (one host sync) when None.
            shared: prompt rows shared by several samples (dash.attention.SharedPrompts); None: plain packing.

        Returns:
            (T, H) hidden states in the model dtype.
        """
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be [T], got {tuple(input_ids.shape)} and "
                             f"{tuple(positions.shape)}")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        cos, sin = self.model.rotary_emb(positions)  # [T, D] each, fp32
        x = self.model.embed_tokens(input_ids)  # [T, H]
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if checkpointed:  # saves only x; backward reruns the layer (deterministic ops: the same activations)
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, shared,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, shared)
        return self.model.norm(x)

    def paged_forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """One sampler step on the paged KV cache (no autograd). input_ids: (T,) long; ctx: the step's attention
        metadata, RoPE tables and each layer's LayerState -> final-normed hidden states of the sampled rows [R, H]."""
        x = self.model.embed_tokens(input_ids)  # [T, H]: the residual stream, a fresh tensor updated in place
        for layer, state in zip(self.model.layers, ctx.layers, strict=True):
            layer.paged_forward(x, ctx, state)
        if ctx.logits_index is not None:
            x = x[ctx.logits_index]  # [E, H]: only the last token of each prefill is sampled
        return rms_norm(x, self.model.norm.weight, self.model.norm.eps)  # [R, H]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Padded convenience: input_ids (B, L), attention_mask (B, L) of 0/1 (left or right padding) -> (B, L, V).

        Positions count real tokens only (mask cumsum - 1), like HF `generate`. Pad positions get the logits of a
        zero hidden state.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()  # [B, L]
        lengths = mask.sum(dim=1)  # [B]
        cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)  # [B+1]
        positions = (mask.long().cumsum(dim=1) - 1)[mask]  # [T], row-major = packing order
        hidden = self.forward_packed(input_ids[mask], cu_seqlens, positions)  # [T, H]
        full = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])  # [B, L, H]
        full[mask] = hidden
        return self.compute_logits(full)
