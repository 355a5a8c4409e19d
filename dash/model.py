"""The Llama / Qwen2 / Qwen2.5 / Qwen3 decoder family in plain torch: one module for training and sampling.

Architecture (all three families): token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> lm_head (tied to the embedding or not). Family differences
are config flags: Qwen2 has q/k/v biases, Qwen3 normalises each query / key head (RMSNorm over head_dim) before RoPE
and may have head_dim != hidden_size / num_attention_heads.

Submodule names equal HF's, so `state_dict()` keys are exactly the tensor names of an HF safetensors checkpoint
(`model.layers.0.self_attn.q_proj.weight`, ...). With tied embeddings there is no `lm_head` module at all, which is
also what HF writes to disk. The RoPE inverse frequencies are a plain fp32 attribute, not a buffer, so they never
appear in the state dict and `model.to(torch.bfloat16)` cannot round them.

Entry points:
- `forward_packed(input_ids[T], cu_seqlens[B+1], positions[T], shared=None) -> hidden[T, H]`: training. Sequences
  are packed end to end (with `shared`, the samples of one prompt share its rows: dash.attention.SharedPrompts); the
  lm_head is NOT applied (dash_kernels fuses it with the log-prob so [T, V] logits never exist).
- `forward(input_ids[B, L], attention_mask[B, L]) -> logits[B, L, V]`: padded convenience for evals and tests.
- The paged-KV sampler does not call these modules' forwards: it reads each layer's parameters and runs its own
  inference chain (dash_kernels.decoder_layer, dash/engine/runner.py).

Departures from HF: padded `forward` takes positions from the mask (so left padding is handled like HF `generate`
does), and logits at pad positions are the lm_head of a zero vector (meaningless, as in HF).

`ModelConfig` (dash/model_config.py) parses and validates an HF `config.json` (both the transformers 4.x
`rope_theta` / `rope_scaling` keys and the 5.x `rope_parameters` dict) and writes both spellings (only 5.24 is
installed and tested here). Tests:
`.venv/bin/python -m pytest tests/model -q`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dash.attention import SharedPrompts, varlen_attention
from dash.model_config import ModelConfig
from dash_kernels.rms_norm import rms_norm_ref
from dash_kernels.rotary import rotary_ref

_LOGITS_ROW_BLOCK = 8192  # vocabulary rows upcast at a time by compute_logits_fp32 on CPU (32 MiB at H = 1024)

__all__ = ["ModelConfig", "CausalLM", "Attention", "RMSNorm", "RotaryEmbedding", "apply_rope"]

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

    def project_qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        """hidden: (..., H) -> fp32 logits (..., V), accumulated in fp32 and never rounded to a bf16 / fp16 model's
        dtype: what the sampler draws from, so its log-probs match the trainer's fused kernel (fp32 accumulators).
        Rounding logits to bf16 first would move them by up to 2^-8 of their size (0.06 nats at a logit of 16)."""
        w = self.lm_head_weight  # [V, H]
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

    def forward_packed(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        positions: torch.Tensor,
        max_seqlen: int | None = None,
        shared: SharedPrompts | None = None,
    ) -> torch.Tensor:
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
