"""dash_kernels.paged_attention against a dense fp64 reference: the C++ kernel (fp32 CPU, decode and query runs), the
gather + SDPA reference path, and the Triton kernel (in the Triton interpreter, in a subprocess because
TRITON_INTERPRET must be set before triton is imported); plus the CPU prefill dispatch rule.

Run: .venv/bin/python -m pytest tests/kernels/test_paged_attention.py -q
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dash_kernels import backend
from dash_kernels.paged_attention import MAX_SPLITS, cpu_prefill_prefers_pages, decode_num_splits, paged_attention

ROOT = Path(__file__).resolve().parents[2]


def make_case(q_lens, ctx_lens, page_size, Hq=4, Hkv=2, D=16, seed=0):
    """Random paged cache with scattered pages; returns inputs and the dense per-sequence K/V."""
    g = torch.Generator().manual_seed(seed)
    B = len(ctx_lens)
    pages = [-(-c // page_size) for c in ctx_lens]
    W = max(pages)
    num_pages = sum(pages) + 3
    perm = torch.randperm(num_pages, generator=g)
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=g)
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=g)
    table = torch.zeros(B, W, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[used: used + n].to(torch.int32)
        used += n
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, table, torch.tensor(ctx_lens, dtype=torch.int32), cu


def dense_ref(q, k_cache, v_cache, table, ctx_lens, cu, scale, out_dtype=torch.float32):
    """fp64, one sequence at a time, explicit causal mask: query i of a run of n sits at position ctx - n + i.
    Returned in out_dtype (fp32 by default; torch.float64 keeps the reference unrounded)."""
    out = []
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    for b in range(table.shape[0]):
        n_ctx = int(ctx_lens[b])
        slots = torch.tensor([int(table[b, t // page_size]) * page_size + t % page_size for t in range(n_ctx)])
        k = k_cache.reshape(-1, Hkv, k_cache.shape[3])[slots].double()  # [ctx, Hkv, D]
        v = v_cache.reshape(-1, Hkv, v_cache.shape[3])[slots].double()
        qs = q[int(cu[b]): int(cu[b + 1])].double()  # [n, Hq, D]
        group = qs.shape[1] // Hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        pos = n_ctx - qs.shape[0] + torch.arange(qs.shape[0])
        scores = scores.masked_fill(torch.arange(n_ctx)[None, :] > pos[:, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(out).to(out_dtype)


@pytest.mark.parametrize("impl", ["torch", "reference"])  # torch: the C++ in-place loop for fp32 CPU
# D 32 / 64 / 128 take the C++ loop's compile-time head-dim paths, 13 and 16 the generic one.
@pytest.mark.parametrize("page_size,Hq,Hkv,D", [(1, 4, 2, 16), (3, 6, 3, 13), (16, 4, 1, 64), (16, 4, 2, 32),
                                                (5, 8, 2, 128)])
def test_decode_matches_dense(page_size, Hq, Hkv, D, impl):
    ctx = [1, 7, 16, 33, 5, 8, 70]  # 70: several row blocks and pages, a partial last page
    q, k, v, table, lens, cu = make_case([1] * len(ctx), ctx, page_size, Hq=Hq, Hkv=Hkv, D=D)
    with backend.use_backend(impl):
        out = paged_attention(q, k, v, table, lens, scale=0.3)
    assert (out - dense_ref(q, k, v, table, lens, cu, 0.3)).abs().max() < 1e-5


@pytest.mark.parametrize("D", [13, 32])
def test_cpu_decode_extreme_scores(D):
    """Score gaps beyond fp32 exp's range (weights that underflow to 0) and one dominant key, as the reference."""
    ctx = [40, 3, 17]
    q, k, v, table, lens, cu = make_case([1] * len(ctx), ctx, 4, D=D)
    q = q * 60.0  # scores spread over hundreds: most exp(s - max) underflow
    out = paged_attention(q, k, v, table, lens, scale=1.0)
    ref = dense_ref(q, k, v, table, lens, cu, 1.0)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() < 1e-5


def test_cpu_decode_same_result_on_any_thread_count():
    """Each (sequence, KV head) is computed whole by one thread: splitting the batch cannot change a bit."""
    ctx = [5 + (7 * i) % 40 for i in range(96)]
    q, k, v, table, lens, _ = make_case([1] * len(ctx), ctx, 16, D=32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention(q, k, v, table, lens)
        torch.set_num_threads(2)
        two = paged_attention(q, k, v, table, lens)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(one[:10], paged_attention(q[:10], k, v, table[:10], lens[:10]))  # nor the batch around a row


def test_cpu_rejects_out_of_range_pages():
    q, k, v, table, lens, _ = make_case([1, 1], [3, 4], 4)
    table[1, 0] = 10_000
    with pytest.raises(ValueError, match="page id out of range"):
        paged_attention(q, k, v, table, lens)


@pytest.mark.parametrize("impl", ["torch", "reference"])  # torch: the C++ loop also serves query runs
@pytest.mark.parametrize("page_size,D", [(2, 8), (5, 8), (16, 32), (3, 64)])
def test_prefill_with_cached_prefix_matches_dense(page_size, D, impl):
    q_lens, ctx = [3, 1, 9, 4, 20], [10, 1, 9, 21, 37]  # the third has no prefix; the second is a decode row
    q, k, v, table, lens, cu = make_case(q_lens, ctx, page_size, Hq=6, Hkv=3, D=D)
    with backend.use_backend(impl):
        out = paged_attention(q, k, v, table, lens, cu, scale=D**-0.5)
    assert (out - dense_ref(q, k, v, table, lens, cu, D**-0.5)).abs().max() < 1e-5


def test_cpu_prefill_query_equals_decode_at_its_position():
    """A task computes one query token whole: the last query of a run gets the same bits as a decode call, and a
    run's result does not depend on the thread count."""
    q_lens, ctx = [5, 12, 1], [9, 12, 30]
    q, k, v, table, lens, cu = make_case(q_lens, ctx, 4, D=32)
    out = paged_attention(q, k, v, table, lens, cu)
    last = cu[1:].long() - 1  # [B] the last query of each run sits at position ctx - 1, as a decode query would
    assert torch.equal(out[last], paged_attention(q[last], k, v, table, lens))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention(q, k, v, table, lens, cu)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, out)


@pytest.mark.parametrize("cu,match", [([0, 2, 1, 4], "queries but"),  # decreasing offsets
                                      ([0, 4, 4, 4], "queries but"),  # 4 queries in a 3-token context
                                      ([0, 1, 2, 3, 4], "B \\+ 1"),  # one offset too many
                                      ([0, 1, 2, 3], "from 0 to T")])  # ends before the last query
def test_cpu_rejects_bad_query_offsets(cu, match):
    q, k, v, table, lens, _ = make_case([1, 1, 2], [3, 4, 5], 4)
    with pytest.raises(ValueError, match=match):
        paged_attention(q, k, v, table, lens, torch.tensor(cu, dtype=torch.int32))


def test_cpu_decode_needs_one_query_per_sequence():
    q, k, v, table, lens, _ = make_case([1, 1], [3, 4], 4)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_attention(q[:1], k, v, table, lens)


@pytest.mark.parametrize("q_lens,expected", [([16] * 256, True),  # short runs: the kernel, even at equal lengths
                                              ([64, 1], True),  # the longest run at the short limit
                                              ([256] * 16, False),  # long equal runs: SDPA pads nothing
                                              ([65, 65], False),
                                              ([256, 128, 128, 128], True),  # SDPA would do 2.3x the real work
                                              ([256, 230, 240, 250], False)])  # 1.1x: not worth the slower kernel
def test_cpu_prefill_prefers_pages(q_lens, expected):
    assert cpu_prefill_prefers_pages(torch.tensor(q_lens)) is expected


@pytest.mark.parametrize("seqs,kv_heads,max_context,sms,expected", [
    (256, 2, 1024, 132, 1),  # Qwen2.5-0.5B at batch 256: 512 (sequence, KV head) programs fill 132 SMs already
    (8, 2, 1024, 132, 8),  # 16 programs: split down to 128 keys each
    (8, 2, 100_000, 132, MAX_SPLITS),  # long context: the SM target asks ceil(264 / 16) = 17, capped at 16
    (1, 2, 200, 132, 1),  # fewer than 2 x 128 keys: one split
    (64, 2, 4096, 132, 3),  # 128 programs: ceil(264 / 128)
    (3, 2, 700, 8, 3),  # the interpreter's 8 "SMs"
    (0, 2, 700, 132, 1),  # empty batch
])
def test_decode_num_splits(seqs, kv_heads, max_context, sms, expected):
    assert decode_num_splits(seqs, kv_heads, max_context, sms) == expected


def test_rejects_mismatched_heads():
    q, k, v, table, lens, _ = make_case([1, 1], [3, 4], 4)
    with pytest.raises(ValueError, match="paged_attention"):
        paged_attention(q[:, :3], k, v, table, lens)


def test_triton_launcher_checks_the_layout_it_assumes_before_launching():
    """The kernel reads q[t, h] as D consecutive values and slot s at s * k_cache.stride(1): a q without unit stride
    on D or a non-contiguous cache would be read wrongly, so the launcher refuses them (host metadata, no launch:
    these CPU tensors would fail any real launch)."""
    pytest.importorskip("triton")
    from dash_kernels.paged_attention import paged_attention_fwd

    q, k, v, table, lens, cu = make_case([1, 1], [3, 4], 4, D=16)
    strided_q = torch.randn(2, 16, 4).transpose(1, 2)  # [2, 4, 16] with stride 4 on D
    strided_k = torch.randn(k.shape[0], k.shape[1], k.shape[3], k.shape[2]).transpose(2, 3)  # same shape, D strided
    args = (table, lens, cu, 1, 0.25)
    with pytest.raises(ValueError, match=r"q must have unit stride on its last \(head_dim\) dimension"):
        paged_attention_fwd(strided_q, k, v, *args)
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        paged_attention_fwd(q, strided_k, v, *args)
    with pytest.raises(ValueError, match="v_cache must be contiguous"):
        paged_attention_fwd(q, k, torch.cat([v, v], 1)[:, ::2], *args)  # pages with gaps between slots


_INTERPRETER_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_paged_attention import make_case, dense_ref
from dash_kernels import backend
from dash_kernels.paged_attention import paged_attention
backend.override = "triton"
worst = 0.0
for q_lens, ctx, page, hq, hkv, d in [([1, 1, 1], [1, 9, 40], 16, 4, 2, 16), ([1, 1], [5, 17], 3, 2, 2, 8),
                                      ([3, 20, 1], [10, 20, 7], 5, 4, 1, 16)]:
    q, k, v, table, lens, cu = make_case(q_lens, ctx, page, Hq=hq, Hkv=hkv, D=d)
    decode = all(n == 1 for n in q_lens)
    out = paged_attention(q, k, v, table, lens, None if decode else cu, scale=d ** -0.5)
    worst = max(worst, float((out - dense_ref(q, k, v, table, lens, cu, d ** -0.5)).abs().max()))
print("MAXERR", worst)

# The sampler end to end on the Triton kernels (attention, sampling, RMSNorm, RoPE): same tokens as the CPU path.
from dash.engine import SamplingParams, generate
from dash.model import CausalLM, ModelConfig
torch.manual_seed(0)
model = CausalLM(ModelConfig(model_type="qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, head_dim=16,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64))
prompts = [[3, 4, 5], list(range(6, 17))]
greedy = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=[])
# Sampled with a min-tokens stop mask: the Triton sampling kernel against the C++ one (same seeded uniforms).
sampled = SamplingParams(temperature=0.9, min_new_tokens=2, max_new_tokens=6, stop_token_ids=[7], seed=3)
runs = dict()
for name in ("triton", "torch"):
    backend.override = name
    runs[name] = [[o[0].token_ids for o in generate(model, None, prompts, params=p, page_size=4)]
                  for p in (greedy, sampled)]
print("ENGINE_SAME", runs["triton"] == runs["torch"])
"""


@pytest.mark.slow
def test_triton_kernel_in_interpreter():
    """Kernel vs dense reference on decode and prefill-with-prefix cases, then inside the engine's decode loop."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = _INTERPRETER_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = float(proc.stdout.split("MAXERR")[1].split()[0])
    assert err < 1e-4, err
    assert "ENGINE_SAME True" in proc.stdout, proc.stdout


@pytest.mark.parametrize("cap,ptxas_name,arch", [(80, "ptxas", "sm_80"), (90, "ptxas-blackwell", "sm_90a")])
def test_triton_kernel_aot_compiles_without_spills(cap, ptxas_name, arch, tmp_path):
    """Ahead-of-time compile for A100 / H100 (no GPU needed) with AOT_SIGNATURE; ptxas must report no spills."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import dash_kernels.aot  # noqa: F401  (pins Triton's FP-fusion default, as every AOT build here does)
    from dash_kernels.paged_attention import AOT_SIGNATURE, _paged_attention_kernel

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / ptxas_name
    if not ptxas.exists():
        pytest.skip(f"{ptxas} not shipped with this triton")
    sig, constexprs = AOT_SIGNATURE("bf16", page_size=16, head_dim=128, group=7)
    kernel = triton.compile(ASTSource(fn=_paged_attention_kernel, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", cap, 32))
    ptx = tmp_path / "paged_attention.ptx"
    ptx.write_text(kernel.asm["ptx"])
    proc = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(ptx), "-o", os.devnull], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 bytes spill stores" in proc.stderr + proc.stdout


def test_fp32_cache_gets_full_precision_dots_on_gpu():
    """tl.dot on fp32 operands defaults to TF32 (10-bit mantissa, ~1e-3 relative): an fp32 cache must compile to
    full fp32 products (FMA, no tensor-core mma) unless torch allows TF32; a bf16 cache keeps the tensor cores."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import dash_kernels.aot  # noqa: F401
    from dash_kernels.ops._triton_utils import dot_precision
    from dash_kernels.paged_attention import AOT_SIGNATURE, _paged_attention_kernel

    assert dot_precision(torch.float32) == ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    assert dot_precision(torch.bfloat16) == "tf32"
    for dtype, tensor_cores in (("fp32", False), ("bf16", True)):
        sig, constexprs = AOT_SIGNATURE(dtype, page_size=16, head_dim=64, group=1)
        kernel = triton.compile(ASTSource(fn=_paged_attention_kernel, signature=sig, constexprs=constexprs),
                                target=GPUTarget("cuda", 80, 32))
        assert ("mma.sync" in kernel.asm["ptx"]) is tensor_cores, dtype
