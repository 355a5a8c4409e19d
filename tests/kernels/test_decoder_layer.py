"""dash_kernels.decoder_layer: the C++ layer (`torch.ops.dash.decoder_layer_`, fp32 CPU) against the reference chain
and against the training model's `DecoderLayer`.

- vs `decoder_layer_ref` with paged attention: both call the same kernels in the same order, so x and both caches must
  be bitwise equal.
- vs `dash.model.DecoderLayer` (the trainer's packed forward): a prefill of whole sequences, then one decode token
  per sequence on top of the prefill's cache, against the fp64 model on the full sequences, with
  kernel_testing.assert_close_to_ref's criterion (error <= 2x the fp32 model's own error + atol).
"""

import pytest
import torch

import dash_kernels
from dash.model import DecoderLayer, ModelConfig, RotaryEmbedding
from dash_kernels import _C, backend
from dash_kernels.decoder_layer import LAYER_WEIGHTS, decoder_layer_, decoder_layer_ref, pack_layer
from dash_kernels.kv import store_kv
from dash_kernels.paged_attention import paged_attention
from tests.kernels.kernel_testing import assert_close_to_ref

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

PAGE = 4
LENS = [5, 11, 1, 8]  # ragged prompts, across page boundaries, one of a single token
# Llama (no biases), Qwen2 (q/k/v biases), Qwen3 (q/k norm), Llama with attention_bias (q/k/v and o_proj biases);
# head_dim 32 takes the attention kernel's unrolled path, 24 the generic one; GQA with 2 query heads per KV head, and
# MHA.
VARIANTS = {
    "llama": dict(model_type="llama", head_dim=32),
    "qwen2-bias": dict(model_type="qwen2", attention_bias=True, head_dim=32),
    "qwen3-qk-norm": dict(model_type="qwen3", qk_norm=True, head_dim=24),
    "llama-biases-mha": dict(model_type="llama", attention_bias=True, head_dim=24, num_key_value_heads=4),
}


def make_layer(variant: str, seed: int = 0):
    args = dict(vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    config = ModelConfig(**{**args, **VARIANTS[variant]})
    torch.manual_seed(seed)
    layer = DecoderLayer(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (they start at 1 / 0)
        for name, p in layer.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return config, layer


def detached(layer):
    """The layer's weights in LAYER_WEIGHTS order, without autograd (None for absent slots)."""
    return [None if t is None else t.detach() for t in layer.weight_slots()]


def paged_layout(lens, page_size=PAGE):
    """Page tables [B, W] (pages handed out shuffled) and a slot function for (sequence, position)."""
    W = max(-(-n // page_size) for n in lens)
    pages = torch.randperm(len(lens) * W, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    table = pages.view(len(lens), W).contiguous()
    return table, lambda b, i: int(table[b, i // page_size]) * page_size + i % page_size


def caches(config, num_pages):
    shape = (num_pages, PAGE, config.num_key_value_heads, config.head_dim)
    return torch.zeros(shape), torch.zeros(shape)


def rope(config, positions):
    cos, sin = RotaryEmbedding(config)(positions)
    return cos.contiguous(), sin.contiguous()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_cpp_layer_equals_reference_chain(variant, step):
    config, layer = make_layer(variant)
    weights = detached(layer)
    table, slot = paged_layout([n + 1 for n in LENS])
    k0, v0 = caches(config, table.numel())
    k0.normal_(generator=torch.Generator().manual_seed(2))  # earlier tokens' K/V (decode reads them)
    v0.normal_(generator=torch.Generator().manual_seed(3))
    if step == "prefill":
        q_lens = LENS
        positions = torch.cat([torch.arange(n) for n in LENS])
        slots = [slot(b, i) for b, n in enumerate(LENS) for i in range(n)]
        cu = torch.tensor([0] + LENS).cumsum(0).to(torch.int32)
    else:
        q_lens = [1] * len(LENS)
        positions = torch.tensor(LENS)  # each sequence's next position
        slots = [slot(b, n) for b, n in enumerate(LENS)]
        cu = None
    context = torch.tensor(LENS if step == "prefill" else [n + 1 for n in LENS], dtype=torch.int32)
    slots = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(sum(q_lens), config.hidden_size, generator=torch.Generator().manual_seed(4))
    cos, sin = rope(config, positions)
    eps, scale = config.rms_norm_eps, config.head_dim ** -0.5

    x_cpp, k_cpp, v_cpp = x.clone(), k0.clone(), v0.clone()
    torch.ops.dash.decoder_layer_(x_cpp, weights, eps, cos, sin, k_cpp, v_cpp, slots, table, context, cu, scale, [])

    x_ref, k_ref, v_ref = x.clone(), k0.clone(), v0.clone()

    def attend(q, k, v):
        store_kv(k, v, k_ref, v_ref, slots)
        return paged_attention(q, k_ref, v_ref, table, context, cu, scale=scale)

    with torch.inference_mode():
        decoder_layer_ref(x_ref, weights, eps, cos, sin, attend)
    assert torch.equal(x_cpp, x_ref)
    assert torch.equal(k_cpp, k_ref) and torch.equal(v_cpp, v_ref)
    assert not torch.equal(x_cpp, x)  # the layer did update x in place


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("gemm", ["torch", "packed"])
def test_prefill_then_decode_matches_training_layer(variant, gemm):
    """The engine's use: prefill whole prompts into the pages, then one decode token each, vs the model's layer; with
    torch's GEMMs and with the packed AVX-512 ones (residual adds and SwiGLU in their epilogues)."""
    if gemm == "packed" and not _C.has_avx512():
        pytest.skip("this CPU has no AVX-512: the sampler keeps torch's GEMMs")
    config, layer = make_layer(variant)
    full = [n + 1 for n in LENS]  # prompt + the decoded token
    x_full = torch.randn(sum(full), config.hidden_size, generator=torch.Generator().manual_seed(5))  # [sum(full), H]
    cu_full = torch.tensor([0] + full).cumsum(0).to(torch.int32)
    pos_full = torch.cat([torch.arange(n) for n in full])
    last = cu_full[1:].long() - 1  # the decoded token of each sequence
    prompt_rows = torch.ones(len(x_full), dtype=torch.bool)
    prompt_rows[last] = False

    def model_out(dtype):
        ref_layer = DecoderLayer(config).to(dtype)
        ref_layer.load_state_dict(layer.state_dict())
        cos, sin = rope(config, pos_full)
        with torch.no_grad():
            return ref_layer(x_full.to(dtype), cos.to(dtype), sin.to(dtype), cu_full, max(full))

    ref64, naive = model_out(torch.float64), model_out(torch.float32)

    weights = detached(layer)
    packed = pack_layer(weights) if gemm == "packed" else None
    assert (packed is not None) == (gemm == "packed")
    eps, scale = config.rms_norm_eps, config.head_dim ** -0.5
    table, slot = paged_layout(full)
    k_cache, v_cache = caches(config, table.numel())
    # Prefill of the prompts (query runs), then the decode step on the cache it filled.
    x_pre = x_full[prompt_rows].clone()
    cos, sin = rope(config, pos_full[prompt_rows])
    slots = torch.tensor([slot(b, i) for b, n in enumerate(LENS) for i in range(n)], dtype=torch.int32)
    cu = torch.tensor([0] + LENS).cumsum(0).to(torch.int32)
    with torch.inference_mode():
        decoder_layer_(x_pre, weights, eps, cos, sin, k_cache, v_cache, slots, table,
                       torch.tensor(LENS, dtype=torch.int32), cu, scale, packed=packed)
        x_dec = x_full[last].clone()
        cos, sin = rope(config, pos_full[last])
        slots = torch.tensor([slot(b, n) for b, n in enumerate(LENS)], dtype=torch.int32)
        decoder_layer_(x_dec, weights, eps, cos, sin, k_cache, v_cache, slots, table,
                       torch.tensor(full, dtype=torch.int32), None, scale, packed=packed)
    atol = 2e-6 * ref64.abs().max().item()
    assert_close_to_ref(f"{variant} prefill", x_pre, naive[prompt_rows], ref64[prompt_rows], atol=atol)
    assert_close_to_ref(f"{variant} decode", x_dec, naive[last], ref64[last], atol=atol)


def test_public_function_takes_the_cpp_op_only_where_it_applies(monkeypatch):
    """fp32 CPU -> the C++ op; the reference backend -> the reference chain (same bits); fp64 -> the chain too."""
    config, layer = make_layer("qwen3-qk-norm")
    weights = detached(layer)
    table, slot = paged_layout([2])
    slots = torch.tensor([slot(0, 0), slot(0, 1)], dtype=torch.int32)
    args = (torch.tensor([2], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32), config.head_dim ** -0.5)
    cos, sin = rope(config, torch.arange(2))
    x = torch.randn(2, config.hidden_size)
    outs = {}
    for mode in ("torch", "reference"):
        monkeypatch.setattr(backend, "override", mode)
        k_cache, v_cache = caches(config, table.numel())
        with torch.inference_mode():
            outs[mode] = decoder_layer_(x.clone(), weights, config.rms_norm_eps, cos, sin, k_cache, v_cache, slots,
                                        table, *args)
    assert torch.allclose(outs["torch"], outs["reference"], rtol=1e-5, atol=1e-5)
    assert pack_layer(weights) is None  # still forced to the reference: no packing
    monkeypatch.setattr(backend, "override", None)
    assert (pack_layer(weights) is not None) == bool(_C.has_avx512())
    assert pack_layer([None if w is None else w.double() for w in weights]) is None
    monkeypatch.setattr(backend, "override", None)
    k64, v64 = (t.double() for t in caches(config, table.numel()))
    with torch.inference_mode():
        weights64 = [None if w is None else w.double() for w in weights]
        out64 = decoder_layer_(x.double(), weights64, config.rms_norm_eps, cos.double(),
                               sin.double(), k64, v64, slots, table, *args)
    assert torch.allclose(out64.float(), outs["torch"], rtol=1e-4, atol=1e-4)


def test_bad_weights_are_rejected_before_any_work():
    config, layer = make_layer("llama")
    weights = detached(layer)
    table, slot = paged_layout([1])
    k_cache, v_cache = caches(config, table.numel())
    cos, sin = rope(config, torch.arange(1))
    x = torch.randn(1, config.hidden_size)
    meta = (torch.tensor([slot(0, 0)], dtype=torch.int32), table, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match=f"weights must have {len(LAYER_WEIGHTS)} slots"):
        decoder_layer_(x, weights[:-1], 1e-6, cos, sin, k_cache, v_cache, *meta)
    no_gate = list(weights)
    no_gate[LAYER_WEIGHTS.index("gate")] = None
    with pytest.raises(ValueError, match=r"\['gate'\] are required"):
        decoder_layer_(x, no_gate, 1e-6, cos, sin, k_cache, v_cache, *meta)
    # The C++ op checks on its own (it is callable directly): slot count, a missing slot, dtypes, head shapes.
    with pytest.raises(ValueError, match="must list 15 slots"):
        torch.ops.dash.decoder_layer_(x, weights[:3], 1e-6, cos, sin, k_cache, v_cache, *meta, None, 0.1, [])
    with pytest.raises(ValueError, match="is required"):
        torch.ops.dash.decoder_layer_(x, no_gate, 1e-6, cos, sin, k_cache, v_cache, *meta, None, 0.1, [])
    half = [w.half() if w is not None else None for w in weights]
    with pytest.raises(ValueError, match="fp32 CPU"):
        torch.ops.dash.decoder_layer_(x, half, 1e-6, cos, sin, k_cache, v_cache, *meta, None, 0.1, [])
    wrong_heads = torch.zeros(k_cache.shape[0], PAGE, 3, config.head_dim)
    with pytest.raises(ValueError, match="whole heads"):
        torch.ops.dash.decoder_layer_(x, weights, 1e-6, cos, sin, wrong_heads, wrong_heads.clone(), *meta, None, 0.1,
                                      [])
    with pytest.raises(ValueError, match="packed must list 6 weights"):
        torch.ops.dash.decoder_layer_(x, weights, 1e-6, cos, sin, k_cache, v_cache, *meta, None, 0.1,
                                      [torch.zeros(1, 1, 32)])
    assert torch.count_nonzero(k_cache) == 0  # nothing was stored by the rejected calls


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_decode_split_over_threads_equals_one_pass(variant):
    """A decode step on packed weights with 2 threads runs each thread's block of rows through the whole layer (one
    parallel region); 1 thread runs one pass over all rows. Rows are independent and the packed GEMM is row-invariant,
    so x and the caches must be bitwise equal; and both within the fp32 error of the torch-GEMM layer."""
    if not _C.has_avx512():
        pytest.skip("this CPU has no AVX-512: the sampler keeps torch's GEMMs (one pass)")
    config, layer = make_layer(variant)
    weights = detached(layer)
    packed = pack_layer(weights)
    lens = [int(n) for n in torch.randint(1, 30, (37,), generator=torch.Generator().manual_seed(9))]  # 37 rows
    table, slot = paged_layout([n + 1 for n in lens])
    k0, v0 = caches(config, table.numel())
    k0.normal_(generator=torch.Generator().manual_seed(2))
    v0.normal_(generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([slot(b, n) for b, n in enumerate(lens)], dtype=torch.int32)
    context = torch.tensor([n + 1 for n in lens], dtype=torch.int32)
    x = torch.randn(len(lens), config.hidden_size, generator=torch.Generator().manual_seed(4))
    cos, sin = rope(config, torch.tensor(lens))
    eps, scale = config.rms_norm_eps, config.head_dim ** -0.5
    outs = {}
    threads = torch.get_num_threads()
    try:
        for n_threads, use_packed in ((1, True), (2, True), (1, False)):
            torch.set_num_threads(n_threads)
            xs, ks, vs = x.clone(), k0.clone(), v0.clone()
            torch.ops.dash.decoder_layer_(xs, weights, eps, cos, sin, ks, vs, slots, table, context, None, scale,
                                          packed if use_packed else [])
            outs[n_threads, use_packed] = xs, ks, vs
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(outs[1, True], outs[2, True]):
        assert torch.equal(a, b)
    torch_x, packed_x = outs[1, False][0], outs[1, True][0]
    assert torch.allclose(packed_x, torch_x, rtol=1e-5, atol=1e-5 * torch_x.abs().max().item())
