"""torch.library.opcheck for every torch.ops.dash op: its schema (declared mutations and aliasing match what the
kernel does), its fake kernel (shapes, dtypes and strides of the real outputs) and, through AOTAutograd, that
torch.compile can trace and functionalize it (mutating ops through auto_functionalize).

Every registered dash op must appear in CASES (test_every_dash_op_is_covered), so a new op cannot skip these checks.
opcheck utils left out (OPCHECK_UTILS lists the ones run), per op and why:
- test_autograd_registration, for all ops: these are inference kernels without a backward, called by the public
  functions only on tensors that need no gradient (`use_cpu_kernel`). With such inputs opcheck skips the check itself
  (it would pass without checking anything), and inputs that require grad are not how the ops are used.
The packed GEMMs (linear_packed, linear_packed_into_, gate_up_silu_packed) need an AVX-512 CPU to run; elsewhere
their opcheck is skipped with that reason and test_packed_gemm_fake_shapes checks their fake kernels' shapes against
F.linear's outputs instead.

Run: `.venv/bin/python -m pytest tests/kernels/test_opcheck.py -q`.
"""

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import dash_kernels
from dash_kernels import _C
from dash_kernels.decoder_layer import LAYER_WEIGHTS

assert dash_kernels.HAS_C, "dash_kernels._C failed to import; rebuild with `pip install -e . --no-build-isolation`"

# Inference kernels: no Autograd kernel to check (module docstring).
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
AVX512_OPS = {"linear_packed", "linear_packed_into_", "gate_up_silu_packed"}
H, HQ, HKV, D, I = 24, 4, 2, 8, 40  # a small GQA layer with odd widths (I is not a multiple of 16 or 32)
PAGE, PAGES = 4, 12


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _paged(q_lens, ctx):
    """Page table [B, W], context_lens [B], cu_seqlens_q [B+1] (None for decode) and the new tokens' slots."""
    width = max((n + PAGE - 1) // PAGE for n in ctx)
    table = torch.arange(len(ctx) * width, dtype=torch.int32).view(len(ctx), width) % PAGES  # [B, W]
    lens = torch.tensor(ctx, dtype=torch.int32)  # [B]
    cu = None if all(n == 1 for n in q_lens) else torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)  # [B+1]
    slots = [int(table[b, p // PAGE]) * PAGE + p % PAGE for b, (q, c) in enumerate(zip(q_lens, ctx))
             for p in range(c - q, c)]
    return table, lens, cu, torch.tensor(slots, dtype=torch.int32)  # slots: [T]


def _caches(seed=1):
    return _randn(PAGES, PAGE, HKV, D, seed=seed), _randn(PAGES, PAGE, HKV, D, seed=seed + 1)


def _layer_weights(qk_norm):
    """LAYER_WEIGHTS order: Qwen2-like (q/k/v biases) or Qwen3-like (q/k RMSNorm, no biases)."""
    shapes = {"input_norm": (H,), "q": (HQ * D, H), "q_bias": (HQ * D,), "k": (HKV * D, H), "k_bias": (HKV * D,),
              "v": (HKV * D, H), "v_bias": (HKV * D,), "q_norm": (D,), "k_norm": (D,), "o": (H, HQ * D),
              "o_bias": None, "post_norm": (H,), "gate": (I, H), "up": (I, H), "down": (H, I)}
    absent = {"q_bias", "k_bias", "v_bias"} if qk_norm else {"q_norm", "k_norm"}
    return [None if shapes[n] is None or n in absent else _randn(*shapes[n], seed=i) * 0.3
            for i, n in enumerate(LAYER_WEIGHTS)]


def _rope(T):
    return _randn(T, D, seed=7).cos(), _randn(T, D, seed=7).sin()


def _decoder_layer_args(prefill, qk_norm):
    q_lens, ctx = ([3, 1, 5], [3, 6, 9]) if prefill else ([1, 1, 1], [2, 6, 9])
    table, lens, cu, slots = _paged(q_lens, ctx)
    k_cache, v_cache = _caches()
    T = sum(q_lens)
    return (_randn(T, H, seed=3), _layer_weights(qk_norm), 1e-6, *_rope(T), k_cache, v_cache, slots, table, lens, cu,
            D ** -0.5, [])


def _paged_attention_args(prefill):
    q_lens, ctx = ([3, 1, 5], [3, 6, 9]) if prefill else ([1, 1, 1], [2, 6, 9])
    table, lens, cu, _ = _paged(q_lens, ctx)
    return (_randn(sum(q_lens), HQ, D, seed=3), *_caches(), table, lens, cu, D ** -0.5)


def _sample_rows_args(filtered):
    B, V = 3, 37
    args = (_randn(B, V), torch.tensor([1.0, 0.0, 0.7]), torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64),
            torch.tensor([[2, -1], [5, 6], [0, 1]]), torch.tensor([True, False, True]))
    return args + ((torch.tensor([0, 5, 3]), torch.tensor([0.9, 1.0, 0.5])) if filtered else ())


def _store_kv_args(check_slots):
    slots = torch.tensor([3, -1, 17, 40, 8], dtype=torch.int32)  # a padding token (-1) is skipped
    return (_randn(5, HKV, D, seed=3), _randn(5, HKV, D, seed=4), *_caches(), slots, check_slots)


def _packed_gemm_args(op):
    x, w = _randn(13, H, seed=3), _randn(37, H, seed=4)
    if op == "gate_up_silu_packed":
        return (x, torch.ops.dash.pack_gate_up(w, _randn(37, H, seed=5)), 37)
    if op == "linear_packed":
        return (x, torch.ops.dash.pack_linear(w), 37, _randn(37, seed=6))
    return (x, torch.ops.dash.pack_linear(w), 37, None, _randn(13, 37, seed=7), True)  # linear_packed_into_


# op name -> {case id: a function building the op's arguments}
CASES = {
    "store_kv": {"checked": lambda: _store_kv_args(True), "unchecked": lambda: _store_kv_args(False)},
    "copy_pages": {"pairs": lambda: (*_caches(), torch.tensor([0, 3], dtype=torch.int32),
                                     torch.tensor([5, 11], dtype=torch.int32))},
    "rms_norm": {"rows": lambda: (_randn(5, H), _randn(H, seed=1), 1e-6),
                 "heads": lambda: (_randn(5, HQ, D), _randn(D, seed=1), 1e-6)},
    "add_rms_norm_": {"rows": lambda: (_randn(5, H), _randn(5, H, seed=1), _randn(H, seed=2), 1e-6)},
    "rotary_": {"gqa": lambda: (_randn(5, HQ, D), _randn(5, HKV, D, seed=1), *_rope(5))},
    "sample_rows": {"plain": lambda: _sample_rows_args(False), "top_k_top_p": lambda: _sample_rows_args(True)},
    "paged_attention": {"decode": lambda: _paged_attention_args(False), "prefill": lambda: _paged_attention_args(True)},
    "decoder_layer_": {"decode": lambda: _decoder_layer_args(False, False),
                       "prefill_qk_norm": lambda: _decoder_layer_args(True, True)},
    "pack_linear": {"odd_n": lambda: (_randn(37, H),)},
    "pack_gate_up": {"odd_i": lambda: (_randn(37, H), _randn(37, H, seed=1))},
    "linear_packed": {"bias": lambda: _packed_gemm_args("linear_packed")},
    "linear_packed_into_": {"accumulate": lambda: _packed_gemm_args("linear_packed_into_")},
    "gate_up_silu_packed": {"odd_i": lambda: _packed_gemm_args("gate_up_silu_packed")},
}


def test_every_dash_op_is_covered():
    """Every op _C registers has cases here and, once `import dash_kernels` has run, a fake kernel (a Meta kernel,
    which torch.library.register_fake installs); no case names an op that does not exist."""
    registered = set(dash_kernels._ext.dispatch_table())
    assert registered == set(CASES), f"ops without opcheck cases: {registered - set(CASES)}, " \
                                     f"cases for unknown ops: {set(CASES) - registered}"
    no_fake = [n for n in registered if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dash::{n}", "Meta")]
    assert not no_fake, f"ops without a fake kernel: {no_fake}"


@pytest.mark.parametrize("op,case", [(op, case) for op, cases in CASES.items() for case in cases])
def test_opcheck(op, case):
    if op in AVX512_OPS and not _C.has_avx512():
        pytest.skip(f"dash::{op} needs an AVX-512 CPU to run (has_avx512() is False here); "
                    "test_packed_gemm_fake_shapes checks its fake kernel")
    torch.library.opcheck(getattr(torch.ops.dash, op).default, CASES[op][case](), test_utils=OPCHECK_UTILS)


def test_packed_gemm_fake_shapes():
    """The packed GEMMs' fake kernels give F.linear's output shape (runs on any CPU: packing needs no AVX-512, and no
    GEMM executes)."""
    x, w = _randn(13, H), _randn(37, H, seed=1)
    packed, packed_gu = torch.ops.dash.pack_linear(w), torch.ops.dash.pack_gate_up(w, w)
    assert packed.shape == (2, H, 32) and packed_gu.shape == (3, H, 32)  # 37 outputs: 2 panels of 32, 3 of 16
    want = F.linear(x, w).shape  # [13, 37]
    with FakeTensorMode() as mode:
        fx, fp, fgu = mode.from_tensor(x), mode.from_tensor(packed), mode.from_tensor(packed_gu)
        assert torch.ops.dash.linear_packed(fx, fp, 37).shape == want
        assert torch.ops.dash.gate_up_silu_packed(fx, fgu, 37).shape == want
        out = torch.empty(want)
        assert torch.ops.dash.linear_packed_into_(fx, fp, 37, None, out, True) is None
