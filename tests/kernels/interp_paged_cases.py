"""The grouped-query paged-attention Triton kernels (dash_kernels/paged_attention.py) on CPU under the interpreter.

Matrix: GQA groups 1, 2, 6, 7 x head dims 64, 128 x page sizes 16, 256 x fp32, bf16, for decode (ragged contexts
with a length of 1, split over programs by `decode_num_splits`, then forced to 1 split and to more splits than the
shortest contexts fill) and for prefill behind cached prefixes (runs of several tokens, a one-token run, a run
without prefix).

Criterion (tests/kernels/kernel_testing.assert_close_to_ref): max|kernel - fp64| <= 2 * max|naive - fp64| + atol,
with fp64 the dense per-sequence reference (`dense_ref`, on the dtype's values) and naive the torch reference in the
input dtype (`paged_attention_ref`: gather + SDPA), i.e. the reference's own error in that dtype sets the bound.

Two interpreter gaps are closed here so that it computes what a GPU computes (fixture `gpu_like_bf16`):
- `tl.dot` on bf16 operands multiplies the raw uint16 bit patterns (Triton 3.9 interpreter; triton-lang/triton
  #11584, "not supported yet"): bf16 operands are widened to fp32 first (exact), then multiplied with fp32
  accumulation, as tensor cores do.
- fp32 -> bf16 casts truncate; a GPU rounds to nearest even (Triton's default): the cast is done by torch.
Not collected by a plain `pytest` run: test_triton_interpreter.py runs this file with TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run without the env
    pytest.skip("run through test_triton_interpreter.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

import numpy as np
import triton.language as tl
from kernel_testing import assert_close_to_ref
from test_paged_attention import dense_ref, make_case
from triton.runtime import interpreter

from dash_kernels import backend
from dash_kernels import paged_attention as pa_module
from dash_kernels.paged_attention import (
    MAX_SPLITS,
    decode_num_splits,
    paged_attention,
    paged_attention_fwd,
    paged_attention_ref,
)

HKV = 2
ATOL_REL = 2e-6  # of max|ref|: a floor where the naive path happens to be exact (fp32 short contexts)
DECODE_CTX = [1, 37, 130, 700]  # ragged; 1: a single key; 700: several pages of 256 and several splits
PREFILL_RUNS = ([3, 1, 20, 9], [10, 1, 20, 300])  # (query run lengths, contexts): prefixes 7, 0 (decode row), 0, 291


def _bf16_as_fp32(data):
    return (data.astype(np.uint32) << 16).view(np.float32)  # bf16 bits are the top half of the fp32 bits


@pytest.fixture(autouse=True)
def gpu_like_bf16(monkeypatch):
    """Interpreter bf16 semantics as on a GPU (see the module docstring); the triton backend forced."""
    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (interpreter.TensorHandle(_bf16_as_fp32(t.data), tl.float32) if t.dtype.scalar == tl.bfloat16 else t
                for t in (a, b))
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)  # nearest even
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)
    with backend.use_backend("triton"):
        yield


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched, in order."""
    calls = []
    for name in ("_paged_attention_kernel", "_paged_attention_combine_kernel"):
        kernel = getattr(pa_module, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                calls.append(name)
                return kernel[grid]

        monkeypatch.setattr(pa_module, name, Spy())
    return calls


def _case(q_lens, ctx, page_size, group, head_dim, dtype, seed):
    q, k, v, table, lens, cu = make_case(q_lens, ctx, page_size, Hq=group * HKV, Hkv=HKV, D=head_dim, seed=seed)
    return (q.to(dtype), k.to(dtype), v.to(dtype)), table, lens, cu


def _check(name, out, qkv, table, lens, cu, decode):
    scale = qkv[0].shape[-1] ** -0.5
    ref = dense_ref(*qkv, table, lens, cu, scale, out_dtype=torch.float64)
    naive = paged_attention_ref(*qkv, table, lens, None if decode else cu, scale)  # in the input dtype
    assert out.dtype == qkv[0].dtype
    assert_close_to_ref(name, out, naive, ref, atol=ATOL_REL * ref.abs().max().item())


MATRIX = [pytest.param(group, d, page, dtype, id=f"g{group}-d{d}-p{page}-{str(dtype)[6:]}")
          for group in (1, 2, 6, 7) for d in (64, 128) for page in (16, 256)
          for dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("group,head_dim,page_size,dtype", MATRIX)
def test_decode_split_by_the_heuristic(group, head_dim, page_size, dtype, launches):
    qkv, table, lens, cu = _case([1] * len(DECODE_CTX), DECODE_CTX, page_size, group, head_dim, dtype, seed=group)
    out = paged_attention(*qkv, table, lens)
    splits = decode_num_splits(len(DECODE_CTX), HKV, table.shape[1] * page_size, pa_module._INTERPRETER_SMS)
    assert splits > 1  # this input must exercise the split + combine path
    assert launches == ["_paged_attention_kernel", "_paged_attention_combine_kernel"]
    _check("decode", out, qkv, table, lens, cu, decode=True)


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, MAX_SPLITS])  # one program per row; splits with no key for short rows
def test_decode_forced_splits(page_size, dtype, num_splits, launches):
    qkv, table, lens, cu = _case([1] * len(DECODE_CTX), DECODE_CTX, page_size, 7, 64, dtype, seed=num_splits)
    out = paged_attention_fwd(*qkv, table, lens, cu, 1, 64 ** -0.5, num_splits=num_splits)
    assert launches == ["_paged_attention_kernel"] + ["_paged_attention_combine_kernel"] * (num_splits > 1)
    _check(f"decode, {num_splits} splits", out, qkv, table, lens, cu, decode=True)


@pytest.mark.parametrize("group,head_dim,page_size,dtype", MATRIX)
def test_prefill_with_cached_prefix(group, head_dim, page_size, dtype, launches):
    q_lens, ctx = PREFILL_RUNS
    qkv, table, lens, cu = _case(q_lens, ctx, page_size, group, head_dim, dtype, seed=10 + group)
    out = paged_attention(*qkv, table, lens, cu)
    assert launches == ["_paged_attention_kernel"]  # query runs are never split
    _check("prefill", out, qkv, table, lens, cu, decode=False)


def test_split_count_is_capped_and_checked():
    qkv, table, lens, cu = _case([1, 1], [5, 9], 16, 2, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match=f"num_splits must be in \\[1, {MAX_SPLITS}\\]"):
        paged_attention_fwd(*qkv, table, lens, cu, 1, 0.125, num_splits=MAX_SPLITS + 1)
