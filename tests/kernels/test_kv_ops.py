"""The compiled KV-cache ops (torch.ops.dash.*) against their pure-torch references (dash_kernels/kv.py)."""

import pytest
import torch

import dash_kernels
from dash_kernels import kv

# The compiled extension must be present after `pip install`: its absence is a packaging bug, not a skip.
assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _caches(num_pages, page_size, heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_pages, page_size, heads, dim, generator=g).to(dtype)
    v = torch.randn(num_pages, page_size, heads, dim, generator=g).to(dtype)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,heads,dim", [(16, 2, 8), (5, 3, 7), (1, 1, 1)])
def test_store_kv_matches_reference(dtype, page_size, heads, dim):
    tokens = 23
    num_pages = tokens // page_size + 2  # room for every token plus spare pages
    k_cache, v_cache = _caches(num_pages, page_size, heads, dim, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(1)
    k_new = torch.randn(tokens, heads, dim, generator=g).to(dtype)
    v_new = torch.randn(tokens, heads, dim, generator=g).to(dtype)
    # Distinct slots (as the allocator guarantees) with a few -1 padding entries.
    slots = torch.randperm(num_pages * page_size, generator=g)[:tokens].to(torch.int32)
    slots[::5] = -1
    kv.store_kv(k_new, v_new, k_cache, v_cache, slots)
    kv.store_kv_ref(k_new, v_new, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # a byte copy must be exact


def test_store_kv_noncontiguous_input_and_empty():
    k_cache, v_cache = _caches(4, 4, 2, 8, torch.float32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k_new = torch.randn(8, 8, 2).transpose(1, 2)  # [8, 2, 8], non-contiguous
    v_new = torch.randn(8, 2, 8)
    slots = torch.arange(3, 11, dtype=torch.int32)
    kv.store_kv(k_new, v_new, k_cache, v_cache, slots)
    kv.store_kv_ref(k_new, v_new, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    empty = torch.empty(0, 2, 8)
    kv.store_kv(empty, empty, k_cache, v_cache, torch.empty(0, dtype=torch.int32))
    assert torch.equal(k_cache, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_pages_matches_reference(dtype):
    k_cache, v_cache = _caches(9, 6, 2, 5, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    src = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    dst = torch.tensor([1, 2, 5, 7], dtype=torch.int32)
    kv.copy_pages(k_cache, v_cache, src, dst)
    kv.copy_pages_ref(k_ref, v_ref, src, dst)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert torch.equal(k_cache[5], k_cache[3]) and not torch.equal(k_cache[4], k_cache[3])


@pytest.mark.parametrize("bad,match", [
    (dict(slots=torch.tensor([0, 64], dtype=torch.int32)), "slot_mapping"),       # 4 pages x 16 = 64 slots
    (dict(slots=torch.tensor([0, -2], dtype=torch.int32)), "slot_mapping"),
    (dict(slots=torch.tensor([0, 1], dtype=torch.int64)), "int32"),
    (dict(slots=torch.tensor([0], dtype=torch.int32)), "slot_mapping must be"),
    (dict(k=torch.randn(2, 3, 8), v=torch.randn(2, 3, 8)), "k_cache heads"),
    (dict(v=torch.randn(2, 2, 7)), "v shape"),
    (dict(k=torch.randn(2, 2, 8, dtype=torch.float64), v=torch.randn(2, 2, 8, dtype=torch.float64)), "dtype"),
])
@pytest.mark.parametrize("check_slots", [True, False])  # False skips the range check only off the CPU
def test_store_kv_bad_input_raises_value_error(bad, match, check_slots):
    k_cache, v_cache = _caches(4, 16, 2, 8, torch.float32)
    before = k_cache.clone()
    args = dict(k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 8), slots=torch.tensor([0, 1], dtype=torch.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        torch.ops.dash.store_kv(args["k"], args["v"], k_cache, v_cache, args["slots"], check_slots)
    assert torch.equal(k_cache, before), "a rejected call must not have written anything"
    if match == "slot_mapping":  # the reference checks the range of CPU slots whatever check_slots says, too
        with pytest.raises(ValueError, match=match):
            kv.store_kv_ref(args["k"], args["v"], k_cache, v_cache, args["slots"], check_slots)


def test_copy_pages_bad_input_raises_value_error():
    k_cache, v_cache = _caches(4, 2, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.dash.copy_pages(k_cache, v_cache, torch.tensor([0], dtype=torch.int32),
                                  torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        torch.ops.dash.copy_pages(k_cache, v_cache, torch.tensor([0]), torch.tensor([1]))


def test_opcheck_schema_and_fake_kernels():
    k_cache, v_cache = _caches(4, 4, 2, 8, torch.float32)
    k_new, v_new = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([1, 6, -1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dash.store_kv.default, (k_new, v_new, k_cache, v_cache, slots))
    torch.library.opcheck(torch.ops.dash.store_kv.default, (k_new, v_new, k_cache, v_cache, slots, False))
    src, dst = torch.tensor([0], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.dash.copy_pages.default, (k_cache, v_cache, src, dst))


def test_native_ops_only_where_they_have_a_kernel(monkeypatch):
    """CPU caches take the compiled op; CUDA caches only when _C was built with CUDA (a CUDA torch wheel installed
    without nvcc builds a CPU-only _C, whose ops would raise NotImplementedError on CUDA tensors), else the reference.
    A fake cache object stands in for a CUDA tensor (no GPU here)."""
    class FakeCache:
        def __init__(self, kind):
            self.device = torch.device(kind)

    assert kv.native_kv_ops(torch.zeros(1))
    for with_cuda in (False, True):
        monkeypatch.setattr(kv._C, "WITH_CUDA", with_cuda)
        assert kv.native_kv_ops(FakeCache("cuda")) is with_cuda
    assert not kv.native_kv_ops(FakeCache("meta"))
