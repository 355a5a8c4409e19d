"""dash.model / dash.attention against HF transformers (eager attention, fp32) on tiny random models.

Run: .venv/bin/python -m pytest tests/model -q
"""

from __future__ import annotations

import pytest
import torch

from dash import attention
from dash.attention import varlen_attention
from dash.model import CausalLM, ModelConfig
from dash.model_io import load_model, save_model

LENGTHS = [1, 7, 13, 5]  # ragged, with a length-1 sequence (attends only to itself)
LOGIT_ATOL = 1e-4
# Gradients are compared relative to the largest |grad| of each tensor. Both sides are fp32 with the same maths but
# different summation orders (packed vs padded matmuls, SDPA vs eager softmax); measured errors are 1e-6..3e-6,
# so 1e-4 leaves two orders of magnitude of margin while a structural bug (mask, RoPE, bias, tying) is O(1).
GRAD_RTOL = 1e-4


def _attention_ref(q, k, v, lengths, scale):
    """Per-sequence causal attention in fp64 with explicit softmax: [T, Hq, D] -> [T, Hq, D]."""
    out, start, group = [], 0, q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale  # [Hq, n, n]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))  # [n, Hq, D]
        start += n
    return torch.cat(out).to(q.dtype)


@pytest.mark.parametrize("lengths", [[6, 6, 6], LENGTHS, [0, 3, 0, 4]], ids=["equal", "ragged", "empty_seqs"])
def test_varlen_attention_matches_reference(lengths):
    torch.manual_seed(0)
    T, Hq, Hkv, D = sum(lengths), 4, 2, 8
    q, k, v = (torch.randn(T, h, D, requires_grad=True) for h in (Hq, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lengths), D**-0.5)
    ref = _attention_ref(q, k, v, lengths, D**-0.5)
    assert out.shape == (T, Hq, D)
    assert (out - ref).abs().max() < 1e-5
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, gr in zip(grads, grads_ref):
        assert torch.isfinite(g).all() and (g - gr).abs().max() < 1e-5


def test_flash_dispatch(monkeypatch):
    """flash-attn is used only when it imported AND the tensors are fp16 / bf16 on CUDA; otherwise SDPA (tested by
    faking both)."""
    T, D, lengths = 9, 8, [4, 5]
    q, k, v = torch.randn(T, 4, D), torch.randn(T, 2, D), torch.randn(T, 2, D)
    cu = torch.tensor([0, 4, 9], dtype=torch.int64)
    calls = []

    def fake_flash(q_, k_, v_, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        calls.append(dict(cu_dtype=cu_q.dtype, same_cu=cu_q is cu_k, max=(max_q, max_k), scale=softmax_scale,
                          causal=causal))
        return torch.zeros_like(q_)

    assert attention.select_backend(q) == ("flash" if attention.HAS_FLASH_ATTN and q.is_cuda else "sdpa")
    monkeypatch.setattr(attention, "_flash_varlen", fake_flash)
    # flash-attn present but CPU tensors: SDPA fallback.
    assert attention.select_backend(q) == "sdpa"
    out = varlen_attention(q, k, v, cu, 5, 0.5)
    assert not calls and (out - _attention_ref(q, k, v, lengths, 0.5)).abs().max() < 1e-5
    # flash-attn present and "CUDA" tensors: flash for bf16 / fp16, with int32 offsets and the caller's max_seqlen /
    # scale; fp32 (flash-attn raises on it) and head dims over 256 stay on SDPA.
    monkeypatch.setattr(attention, "_on_cuda", lambda t: True)
    assert attention.select_backend(q) == "sdpa"
    assert attention.select_backend(torch.randn(T, 4, 320, dtype=torch.bfloat16)) == "sdpa"
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert attention.select_backend(q) == "flash"
    varlen_attention(q, k, v, cu, 5, 0.5)
    assert calls == [dict(cu_dtype=torch.int32, same_cu=True, max=(5, 5), scale=0.5, causal=True)]
    # "CUDA" tensors but no flash-attn: SDPA again.
    monkeypatch.setattr(attention, "_flash_varlen", None)
    assert attention.select_backend(q) == "sdpa"


def _grad_errors(ours: torch.nn.Module, hf: torch.nn.Module) -> dict[str, float]:
    """Per-parameter max |g_ours - g_hf| / max |g_hf|; the names must match one to one."""
    theirs = dict(hf.named_parameters())
    mine = dict(ours.named_parameters())
    assert mine.keys() == theirs.keys()
    return {n: ((p.grad - theirs[n].grad).abs().max() / theirs[n].grad.abs().max().clamp_min(1e-12)).item()
            for n, p in mine.items()}


def test_packed_matches_hf(spec_name, hf_checkpoint, make_batch):
    hf, folder = hf_checkpoint(spec_name)
    model = load_model(folder)
    ids, cu, pos, padded, mask = make_batch(model.config.vocab_size, LENGTHS)
    hf.zero_grad(set_to_none=True)
    ref = hf(input_ids=padded, attention_mask=mask).logits[mask.bool()]  # [T, V], packing order
    logits = model.compute_logits(model.forward_packed(ids, cu, pos))  # [T, V]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max() <= LOGIT_ATOL

    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (ref * w).sum().backward()
    (logits * w).sum().backward()
    errors = _grad_errors(model, hf)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"{worst}: relative grad error {errors[worst]:.2e}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_forward_matches_hf(spec_name, side, hf_checkpoint, make_batch):
    hf, folder = hf_checkpoint(spec_name)
    model = load_model(folder)
    _, _, _, padded, mask = make_batch(model.config.vocab_size, LENGTHS, seed=2)
    if side == "left":
        padded, mask = _to_left_padding(padded, mask)
    # HF's forward numbers positions 0..L-1 regardless of the mask; pass the real-token positions ourselves.
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(input_ids=padded, attention_mask=mask, position_ids=position_ids).logits
        logits = model(padded, mask)
    real = mask.bool()
    assert logits.shape == ref.shape
    assert (logits[real] - ref[real]).abs().max() <= LOGIT_ATOL


def _to_left_padding(padded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] -> left-padded [B, L] (shift every row's real tokens to the end)."""
    shift = (mask == 0).sum(1)  # [B]
    idx = (torch.arange(mask.shape[1])[None, :] - shift[:, None]) % mask.shape[1]  # [B, L]
    return padded.gather(1, idx), mask.gather(1, idx)


def test_round_trip_through_hf(spec_name, hf_checkpoint, make_batch, tmp_path):
    """Our save_model -> HF AutoModelForCausalLM gives the same logits; and our load gives the same model."""
    from transformers import AutoModelForCausalLM

    hf, folder = hf_checkpoint(spec_name)
    model = load_model(folder)
    out = save_model(model, tmp_path / "ckpt")
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(back).__name__ == type(hf).__name__
    _, _, _, padded, mask = make_batch(model.config.vocab_size, LENGTHS, seed=3)
    with torch.no_grad():
        a = hf(input_ids=padded, attention_mask=mask).logits
        b = back(input_ids=padded, attention_mask=mask).logits
    assert torch.equal(a, b)  # same weights, same HF code: bit-identical
    again = load_model(out)
    assert again.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_llama3_inv_freq_matches_hf(hf_checkpoint):
    """RoPE tables themselves (the parity tests above only see them through the logits)."""
    hf, folder = hf_checkpoint("llama3_rope")
    ours = load_model(folder).config.rope_inv_freq()
    assert torch.equal(ours, hf.model.rotary_emb.inv_freq.cpu())


def test_config_validation_names_field():
    base = dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ValueError, match=r"rope_scaling\.rope_type='yarn'"):
        ModelConfig(**base, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match=r"rope_scaling\.factor"):
        ModelConfig(**base, rope_scaling={"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(**base, num_key_value_heads=3)
    with pytest.raises(ValueError, match="qk_norm"):
        ModelConfig(**{**base, "model_type": "qwen3"}, qk_norm=False)
    # A tiny model built straight from a ModelConfig (the built-in demo model's route) runs both entry points.
    model = CausalLM(ModelConfig(**base, tie_word_embeddings=True))
    assert model.lm_head is None and model.lm_head_weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.state_dict()
    hidden = model.forward_packed(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3], dtype=torch.int32),
                                  torch.tensor([0, 0, 1]))
    assert hidden.shape == (3, 16)


@pytest.mark.parametrize("row_block", [8192, 7])  # 7: the CPU path's weight blocks do not divide the vocabulary
def test_fp32_logits_of_a_bf16_model_are_not_rounded(row_block, monkeypatch):
    """compute_logits_fp32 (what the sampler draws from): fp32 accumulation of the bf16 operands, never rounded to
    bf16 on the way (as compute_logits(...).float() is); fp32 models get exactly compute_logits."""
    import dash.model_parts as model_mod

    monkeypatch.setattr(model_mod, "_LOGITS_ROW_BLOCK", row_block)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="qwen2", vocab_size=50, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    hidden = 4 * torch.randn(3, 5, 64)  # [..., H] with a leading batch shape; logits up to ~7
    assert torch.equal(model.compute_logits_fp32(hidden), model.compute_logits(hidden))
    model = model.bfloat16()
    hidden = hidden.bfloat16()
    exact = hidden.double() @ model.lm_head_weight.double().t()  # [3, 5, V] the bf16 operands' exact products
    ours = model.compute_logits_fp32(hidden)
    assert ours.dtype == torch.float32 and ours.shape == (3, 5, 50)
    # fp32 accumulation of 64 products: measured 5e-7 off; bf16 rounding of a logit near 7 moves it by up to 2^-6.
    assert (ours.double() - exact).abs().max() < 1e-5
    rounded = model.compute_logits(hidden).float()
    assert (rounded.double() - exact).abs().max() > 1e-3  # what the sampler drew from before (measured 0.016)


def test_gradient_checkpointing_same_gradients_fewer_saved_activations():
    """model.gradient_checkpointing (train.gradient_checkpointing): the layers are recomputed in backward, so the
    gradients are the same (the recompute runs the same deterministic ops) while autograd keeps far fewer bytes."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(model_type="qwen2", vocab_size=50, hidden_size=64, intermediate_size=192,
                                 num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 50, (sum(LENGTHS),))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    runs = {}
    for checkpointed in (False, True):
        model.gradient_checkpointing = checkpointed
        model.zero_grad()
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.compute_logits(model.forward_packed(ids, cu, positions)).logsumexp(-1).sum()
        loss.backward()
        runs[checkpointed] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved))
    (loss_a, grads_a, bytes_a), (loss_b, grads_b, bytes_b) = runs[False], runs[True]
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert bytes_b < bytes_a / 2, (bytes_a, bytes_b)
