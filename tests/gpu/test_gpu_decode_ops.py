"""The sampler's Triton kernels on a CUDA device against their references: token sampling, RMSNorm (plain and
residual-fused), RoPE, SiLU * up and paged attention, fp32 and bf16, at small odd shapes and at Qwen2.5's.

Criterion as in tests/kernels (kernel_testing.assert_close_to_ref): max|ours - fp64| <= 2 * max|naive - fp64| + atol
with naive the torch reference in the kernel's dtype (on the GPU, so bf16 rounds to nearest as the kernel does:
the interpreter's truncation allowance of interp_cases.py does not apply). Sampling: sample_testing's criterion.
"""

import pytest
import torch

from dash_kernels import paged_attention as pa_module
from dash_kernels import rms_norm as rms_module
from dash_kernels import rotary as rotary_module
from dash_kernels import sample_rows as sample_module
from dash_kernels import silu_mul as silu_module
from dash_kernels.paged_attention import paged_attention, paged_attention_ref
from dash_kernels.rms_norm import add_rms_norm_, rms_norm, rms_norm_ref
from dash_kernels.rotary import rotary_, rotary_ref
from dash_kernels.sample_rows import sample_rows
from dash_kernels.silu_mul import silu_mul_, silu_mul_ref
from tests.kernels.kernel_testing import assert_close_to_ref
from tests.kernels.sample_testing import check_sampled_rows, sample_inputs
from tests.kernels.test_paged_attention import dense_ref, make_case

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16]
ATOL_REL = 2e-6  # of max|ref|: a floor where the naive path happens to be exact


@pytest.mark.parametrize("V,B", [(1, 33), (7, 33), (2500, 257), (151936, 64)])  # 151936: Qwen2.5's vocabulary
def test_sample_rows(V, B, launches):
    launches.spy(sample_module, "_sample_rows_kernel")
    logits, temperature, u, stop_ids, active = sample_inputs(B, V)
    tokens, logp = sample_rows(*(t.to(CUDA) for t in (logits, temperature, u, stop_ids, active)))
    assert launches == ["_sample_rows_kernel"]
    check_sampled_rows(logits, temperature, u, stop_ids, active, tokens.cpu(), logp.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (9, 41), (3, 5, 64), (256, 896), (256, 1536)])  # 896 / 1536: Qwen2.5
def test_rms_norm_and_silu_mul(dtype, shape, launches):
    for module, name in ((rms_module, "_rms_norm_kernel"), (silu_module, "_silu_mul_kernel")):
        launches.spy(module, name)
    g = torch.Generator().manual_seed(sum(shape))
    x, delta, gate, up = ((torch.randn(*shape, generator=g) * s).to(dtype).to(CUDA) for s in (3, 1, 4, 1))
    w = torch.randn(shape[-1], generator=g).to(dtype).to(CUDA)
    eps = 1e-6
    ref64 = rms_norm_ref(x.double(), w.double(), eps)
    atol = ATOL_REL * ref64.abs().max().item()
    assert_close_to_ref("rms_norm", rms_norm(x, w, eps), rms_norm_ref(x, w, eps), ref64, atol=atol)
    summed = x + delta  # the reference's in-place add rounds to x's dtype, as the kernel's store does
    xr = x.clone()
    out = add_rms_norm_(xr, delta, w, eps)
    assert torch.equal(xr, summed)  # both round the fp32 sum to nearest
    ref64 = rms_norm_ref(summed.double(), w.double(), eps)
    assert_close_to_ref("add_rms_norm_", out, rms_norm_ref(summed, w, eps), ref64,
                        atol=ATOL_REL * ref64.abs().max().item())
    ref64 = silu_mul_ref(gate.double(), up.double())
    naive = silu_mul_ref(gate, up)
    assert silu_mul_(gate, up) is gate
    assert_close_to_ref("silu_mul_", gate, naive, ref64, atol=ATOL_REL * ref64.abs().max().item())
    assert launches == ["_rms_norm_kernel", "_rms_norm_kernel", "_silu_mul_kernel"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D", [(7, 3, 1, 10), (256, 14, 2, 64), (256, 12, 2, 128)])
def test_rotary(dtype, T, Hq, Hkv, D, launches):
    launches.spy(rotary_module, "_rotary_kernel")
    g = torch.Generator().manual_seed(T + D)
    q = torch.randn(T, Hq, D, generator=g).to(dtype).to(CUDA)
    k = torch.randn(T, Hkv, D, generator=g).to(dtype).to(CUDA)
    angles = torch.randn(T, D // 2, generator=g) * 10
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(CUDA) for f in (torch.cos, torch.sin))  # [T, D] fp32 tables
    cos64, sin64 = cos.to(dtype).double(), sin.to(dtype).double()  # the tables as the kernel reads them
    expected = [(rotary_ref(t.double(), cos64, sin64), rotary_ref(t, cos, sin)) for t in (q, k)]
    rotary_(q, k, cos, sin)
    for name, ours, (ref, naive) in zip(("q", "k"), (q, k), expected):
        assert_close_to_ref(f"rotary_ {name}", ours, naive, ref, atol=ATOL_REL * ref.abs().max().item())
    assert launches == ["_rotary_kernel", "_rotary_kernel"]


# (query run lengths, context lengths, page size, Hq, Hkv, D): the interpreter's small cases, then Qwen2.5-0.5B and
# 1.5B heads at the presets' page size 256 (decode of 16 sequences up to 2304 tokens; prefill behind a cached prefix).
PAGED_CASES = [
    ([1, 1, 1], [1, 9, 40], 16, 4, 2, 16), ([3, 20, 1], [10, 20, 7], 5, 4, 1, 16),
    ([1] * 16, [1, 255, 256, 257, 511, 700, 1024, 1500, 1, 2, 100, 2000, 2047, 2048, 2100, 2304], 256, 14, 2, 64),
    ([64, 128, 1, 300], [300, 1000, 2048, 300], 256, 12, 2, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PAGED_CASES, ids=["small-decode", "small-prefill", "0.5b-decode", "1.5b-prefill"])
def test_paged_attention(dtype, case, launches):
    launches.spy(pa_module, "_paged_attention_kernel")
    launches.spy(pa_module, "_paged_attention_combine_kernel")
    q_lens, ctx, page, hq, hkv, d = case
    q, k, v, table, lens, cu = make_case(q_lens, ctx, page, Hq=hq, Hkv=hkv, D=d)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ref = dense_ref(q, k, v, table, lens, cu, d ** -0.5).double()  # fp64 math on the dtype's values, CPU
    decode = all(n == 1 for n in q_lens)
    args = [t.to(CUDA) for t in (q, k, v, table, lens)] + [None if decode else cu.to(CUDA)]
    ours = paged_attention(*args, scale=d ** -0.5)
    naive = paged_attention_ref(*args, scale=d ** -0.5)  # gather + SDPA in the dtype
    # Decode splits long contexts when (sequence, KV head) programs alone leave SMs idle: then a combine pass runs.
    split = decode and pa_module.decode_num_splits(len(ctx), hkv, table.shape[1] * page, pa_module._num_sms(CUDA)) > 1
    assert ours.dtype == dtype
    assert launches == ["_paged_attention_kernel"] + ["_paged_attention_combine_kernel"] * split
    assert_close_to_ref(f"paged_attention {dtype}", ours, naive, ref.to(CUDA), atol=ATOL_REL * ref.abs().max().item())
