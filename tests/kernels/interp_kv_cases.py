"""The Triton KV store and page copy (dash_kernels/store_kv.py, copy_pages.py) on CPU under the Triton interpreter.

They serve CUDA caches when _C has no CUDA kernel (a CUDA torch installed without nvcc); here the compiled ops are
faked absent (`native_kv_ops` -> False) so the public functions take the Triton path on CPU tensors, as they would on
such a GPU. A byte copy must be exact: results are compared with torch.equal against the references.
Not collected by a plain `pytest` run: test_triton_interpreter.py runs this file with TRITON_INTERPRET=1.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run without the env
    pytest.skip("run through test_triton_interpreter.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

from dash_kernels import backend
from dash_kernels import copy_pages as copy_module
from dash_kernels import store_kv as store_module
from dash_kernels.kv import copy_pages, copy_pages_ref, store_kv, store_kv_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def triton_without_native_ops(monkeypatch):
    """Triton backend forced, compiled KV ops absent, every Triton launch recorded (returned list)."""
    monkeypatch.setattr(store_module, "native_kv_ops", lambda cache: False)
    monkeypatch.setattr(copy_module, "native_kv_ops", lambda cache: False)
    calls = []
    for module, name in ((store_module, "_store_kv_kernel"), (copy_module, "_copy_pages_kernel")):
        kernel = getattr(module, name)

        class Spy:
            def __getitem__(self, grid, kernel=kernel, name=name):
                calls.append(name)
                return kernel[grid]

        monkeypatch.setattr(module, name, Spy())
    with backend.use_backend("triton"):
        yield calls


def _caches(num_pages, page_size, heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(num_pages, page_size, heads, dim, generator=g).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,heads,dim", [(16, 2, 64), (5, 3, 7), (1, 1, 1), (4, 14, 24)])
def test_store_kv_triton_matches_reference(dtype, page_size, heads, dim, triton_without_native_ops):
    tokens = 23
    num_pages = tokens // page_size + 2
    k_cache, v_cache = _caches(num_pages, page_size, heads, dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, 3 * heads, dim, generator=g).to(dtype)
    k_new = qkv[:, heads:2 * heads]  # a view of a fused projection: token stride 3 * heads * dim, unit-stride dim
    v_new = torch.randn(tokens, dim, heads, generator=g).to(dtype).transpose(1, 2)  # dim not at unit stride: copied
    slots = torch.randperm(num_pages * page_size, generator=g)[:tokens].to(torch.int32)
    slots[::5] = -1  # padding tokens
    store_kv(k_new, v_new, k_cache, v_cache, slots)
    store_kv_ref(k_new, v_new, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert triton_without_native_ops == ["_store_kv_kernel"]


def test_store_kv_triton_never_writes_out_of_range_and_checks_when_asked(triton_without_native_ops):
    k_cache, v_cache = _caches(3, 4, 2, 8, torch.float32)
    before = k_cache.clone(), v_cache.clone()
    k_new, v_new = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    bad = torch.tensor([12, -1, 1], dtype=torch.int32)  # 3 pages x 4 = 12 slots: 12 is one past the end
    with pytest.raises(ValueError, match=r"slot_mapping has entries outside \[-1, 12\)"):
        store_kv(k_new, v_new, k_cache, v_cache, bad.clone(), check_slots=True)
    assert torch.equal(k_cache, before[0]), "a rejected call must not have written anything"
    # Unchecked (the sampler's contract: slots in range by construction): the kernel skips the bad slot.
    store_module.store_kv_fwd(k_new, v_new, k_cache, v_cache, bad)
    expected_k = before[0].view(12, 2, 8).clone()
    expected_k[1] = k_new[2]
    assert torch.equal(k_cache.view(12, 2, 8), expected_k)
    with pytest.raises(ValueError, match="int32"):
        store_kv(k_new, v_new, k_cache, v_cache, bad.long())
    with pytest.raises(ValueError, match="contiguous"):
        store_kv(k_new, v_new, k_cache.transpose(2, 3).contiguous().transpose(2, 3), v_cache, bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,heads,dim", [(6, 2, 5), (256, 2, 64)])  # 256 x 2 x 64: 16 blocks of a page
def test_copy_pages_triton_matches_reference(dtype, page_size, heads, dim, triton_without_native_ops):
    k_cache, v_cache = _caches(9, page_size, heads, dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    src = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    dst = torch.tensor([1, 2, 5, 7], dtype=torch.int32)
    copy_pages(k_cache, v_cache, src, dst)
    copy_pages_ref(k_ref, v_ref, src, dst)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(k_cache[5], k_cache[3]) and not torch.equal(k_cache[4], k_cache[3])
    assert triton_without_native_ops == ["_copy_pages_kernel"]


def test_copy_pages_triton_range_contract(triton_without_native_ops):
    k_cache, v_cache = _caches(4, 2, 1, 4, torch.float32)
    before = k_cache.clone()
    src, dst = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dst has page ids outside \[0, 4\)"):
        copy_pages(k_cache, v_cache, src, dst)
    assert torch.equal(k_cache, before)
    copy_module.copy_pages_fwd(k_cache, v_cache, src, dst)  # unchecked: the bad pair is skipped, the good one done
    expected = before.clone()
    expected[2] = before[1]
    assert torch.equal(k_cache, expected)
    copy_pages(k_cache, v_cache, src[:0], dst[:0])  # no pairs: nothing launched
    assert triton_without_native_ops == ["_copy_pages_kernel"]
