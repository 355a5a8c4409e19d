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


def test_cuda_caches_without_a_cuda_build_take_the_triton_kernels(monkeypatch):
    """A CUDA cache with a CPU-only _C goes to the Triton kernels (no host sync per layer) when the backend resolves
    to triton, to the reference when torch / reference is forced, and to the compiled op in a CUDA build."""
    from dash_kernels import backend

    class FakeCache:
        device = torch.device("cuda")

    for with_cuda, forced, expected in ((False, "triton", True), (True, "triton", False),
                                        (False, "torch", False), (False, "reference", False)):
        monkeypatch.setattr(kv._C, "WITH_CUDA", with_cuda)
        with backend.use_backend(forced):
            assert kv.triton_kv_ops(FakeCache()) is expected, (with_cuda, forced)
    assert not kv.triton_kv_ops(torch.zeros(1))  # CPU: the C++ op (the interpreter is off in this process)


@pytest.mark.parametrize("bad,match", [
    (dict(slots=torch.tensor([0, 1], dtype=torch.int64)), "int32"),
    (dict(slots=torch.tensor([0], dtype=torch.int32)), "slot_mapping must be"),
    (dict(k=torch.randn(2, 3, 8), v=torch.randn(2, 3, 8)), "caches must be equal"),
    (dict(v=torch.randn(2, 2, 7)), "k and v must be equal"),
    (dict(k=torch.randn(2, 2, 8, dtype=torch.float64), v=torch.randn(2, 2, 8, dtype=torch.float64)), "dtype"),
    (dict(k_cache=torch.randn(4, 16, 8, 2).transpose(2, 3)), "contiguous"),
])
def test_triton_path_host_checks_reject_what_the_compiled_op_rejects(bad, match):
    """The Triton path's checks (shapes, dtypes, layout: metadata, no sync) raise ValueError before any launch."""
    from dash_kernels.store_kv import check_store_kv_args

    args = dict(k=torch.randn(2, 2, 8), v=torch.randn(2, 2, 8), k_cache=torch.zeros(4, 16, 2, 8),
                v_cache=torch.zeros(4, 16, 2, 8), slots=torch.tensor([0, 1], dtype=torch.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        check_store_kv_args(args["k"], args["v"], args["k_cache"], args["v_cache"], args["slots"])


def test_copy_pages_checks_on_every_path():
    from dash_kernels.copy_pages import check_copy_pages_args, check_page_range

    k_cache, v_cache = _caches(4, 2, 1, 4, torch.float32)
    ids = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="dtype mismatch"):
        torch.ops.dash.copy_pages(k_cache, v_cache.double(), ids, ids)  # pages are copied as bytes
    with pytest.raises(ValueError, match="caches must be equal"):
        check_copy_pages_args(k_cache, v_cache.double(), ids, ids)
    with pytest.raises(ValueError, match="int32"):
        check_copy_pages_args(k_cache, v_cache, ids.long(), ids)
    with pytest.raises(ValueError, match=r"src has page ids outside \[0, 4\) \(min -1, max 1\)"):
        check_page_range(torch.tensor([-1, 1], dtype=torch.int32), 4, "src")
    with pytest.raises(ValueError, match=r"dst has page ids outside"):
        kv.copy_pages_ref(k_cache, v_cache, ids, torch.tensor([0, 4], dtype=torch.int32))
