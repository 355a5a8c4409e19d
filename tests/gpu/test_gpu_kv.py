"""The KV-cache ops on CUDA caches, both implementations: the CUDA kernels of a CUDA build of _C (csrc/kv_cache.cu)
and the Triton kernels that serve a CPU-only _C (dash_kernels/store_kv.py, copy_pages.py). A byte copy must be exact
(torch.equal against the references), the sampler's unchecked calls must not synchronise the host with the device
(torch.cuda.set_sync_debug_mode("error") turns any sync into an error), and an out-of-range index is never written.
"""

import contextlib

import pytest
import torch

import dash_kernels
from dash_kernels import copy_pages as copy_module
from dash_kernels import store_kv as store_module
from dash_kernels.kv import copy_pages, copy_pages_ref, store_kv, store_kv_ref

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (page_size, kv_heads, head_dim): odd sizes (the CUDA kernel's bytewise path), Qwen2.5-0.5B and 1.5B at page 256.
SHAPES = [(5, 3, 7), (16, 2, 64), (256, 2, 64), (256, 2, 128)]


def _has_cuda_kernels() -> bool:
    return dash_kernels.HAS_C and bool(dash_kernels._ext._C.WITH_CUDA)


@pytest.fixture(params=["cuda_ext", "triton"])
def impl(request, monkeypatch, launches):
    """cuda_ext: the compiled CUDA kernels (skipped, with the reason, when _C was built without them); triton: the
    Triton kernels, as with a CPU-only _C (the compiled ops are hidden from the dispatch)."""
    if request.param == "cuda_ext":
        if not _has_cuda_kernels():
            pytest.skip("dash_kernels._C has no CUDA kernels (built without nvcc or with a CPU torch)")
    else:
        monkeypatch.setattr(store_module, "native_kv_ops", lambda cache: False)
        monkeypatch.setattr(copy_module, "native_kv_ops", lambda cache: False)
        launches.spy(store_module, "_store_kv_kernel")
        launches.spy(copy_module, "_copy_pages_kernel")
    return request.param


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _caches(num_pages, page_size, heads, dim, dtype, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return tuple(torch.randn(num_pages, page_size, heads, dim, generator=g, device=CUDA).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,heads,dim", SHAPES)
def test_store_kv_exact_and_without_host_sync(impl, dtype, page_size, heads, dim, launches):
    tokens = 300
    num_pages = tokens // page_size + 3
    k_cache, v_cache = _caches(num_pages, page_size, heads, dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    g = torch.Generator(device=CUDA).manual_seed(1)
    k_new = torch.randn(tokens, 3 * heads, dim, generator=g, device=CUDA).to(dtype)[:, heads:2 * heads]  # a view
    v_new = torch.randn(tokens, heads, dim, generator=g, device=CUDA).to(dtype)
    slots = torch.randperm(num_pages * page_size, generator=g, device=CUDA)[:tokens].to(torch.int32)
    slots[::7] = -1
    with no_host_sync():
        store_kv(k_new, v_new, k_cache, v_cache, slots, check_slots=False)  # the sampler's per-layer call
    store_kv_ref(k_new, v_new, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert launches == (["_store_kv_kernel"] if impl == "triton" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,heads,dim", SHAPES)
def test_copy_pages_exact_and_without_host_sync(impl, dtype, page_size, heads, dim, launches):
    k_cache, v_cache = _caches(12, page_size, heads, dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    src = torch.tensor([0, 3, 3, 11, 7], dtype=torch.int32, device=CUDA)
    dst = torch.tensor([1, 2, 5, 10, 8], dtype=torch.int32, device=CUDA)
    with no_host_sync():
        copy_pages(k_cache, v_cache, src, dst, check_pages=False)  # the sampler's copy-on-write call
    copy_pages_ref(k_ref, v_ref, src, dst)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert launches == (["_copy_pages_kernel"] if impl == "triton" else [])


def test_out_of_range_indices_are_refused_when_checked_and_never_written(impl):
    k_cache, v_cache = _caches(4, 16, 2, 64, torch.bfloat16)
    before = k_cache.clone()
    k_new = torch.randn(3, 2, 64, device=CUDA).bfloat16()
    bad_slots = torch.tensor([64, -1, 5], dtype=torch.int32, device=CUDA)  # 4 pages x 16 = 64 slots
    with pytest.raises(ValueError, match=r"slot_mapping has entries outside \[-1, 64\)"):
        store_kv(k_new, k_new, k_cache, v_cache, bad_slots, check_slots=True)
    assert torch.equal(k_cache, before)
    store_kv(k_new, k_new, k_cache, v_cache, bad_slots, check_slots=False)  # slot 64 skipped, slot 5 written
    expected = before.view(64, 2, 64).clone()
    expected[5] = k_new[2]
    assert torch.equal(k_cache.view(64, 2, 64), expected)
    src = torch.tensor([0, 1], dtype=torch.int32, device=CUDA)
    dst = torch.tensor([2, 4], dtype=torch.int32, device=CUDA)
    with pytest.raises(ValueError, match=r"dst has page ids outside \[0, 4\)"):
        copy_pages(k_cache, v_cache, src, dst)
    copy_pages(k_cache, v_cache, src, dst, check_pages=False)  # pair (1 -> 4) skipped
    expected = expected.view(4, 16, 2, 64)
    expected[2] = expected[0]
    assert torch.equal(k_cache, expected)
    torch.cuda.synchronize()  # no asynchronous fault was left behind


def test_dispatcher_has_the_cuda_kernels_a_cuda_build_claims():
    if not _has_cuda_kernels():
        pytest.skip("dash_kernels._C has no CUDA kernels (built without nvcc or with a CPU torch)")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has("dash::store_kv", "CUDA") and has("dash::copy_pages", "CUDA")
