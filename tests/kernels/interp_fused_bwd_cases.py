"""The fused-loss Triton backward (three kernels per vocab chunk, no contended atomics) under the Triton interpreter.

Run by test_triton_interpreter.py in a subprocess with TRITON_INTERPRET=1 (see interp_cases.py for why). The chunk
budget, chunk alignment and program target are shrunk so that these small shapes cross every boundary the real
shape does: several vocab chunks with a ragged last chunk and a ragged last tile, ragged row blocks, and S >= 3 row
splits of the dW reduction (partial planes in the deterministic mode, relaxed atomics otherwise).
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - guard against a direct run without the env
    pytest.skip("run through test_triton_interpreter.py (needs TRITON_INTERPRET=1)", allow_module_level=True)

import triton.runtime.interpreter as interpreter
from kernel_testing import assert_close_to_ref, linear_inputs, logprob_runner, naive_alt_logprobs

from dash_kernels import backend, token_logprobs
from dash_kernels.ops import token_logprobs as tlp
from dash_kernels.ops import token_logprobs_bwd as tlp_bwd
from dash_kernels.reference import token_logprobs_ref

SMALL_ALIGN = 64  # chunk widths a multiple of the fp32 BLOCK_V (64) instead of 128
MANY_PROGRAMS = 10_000  # asks for as many dW splits as MAX_DW_SPLITS and the row blocks allow


@pytest.fixture(autouse=True)
def small_plan(monkeypatch):
    """Two-tile vocab chunks and many dW splits at test shapes; the Triton backend throughout."""
    monkeypatch.setattr(tlp_bwd, "DZ_CHUNK_ALIGN", SMALL_ALIGN)
    for module in (tlp, tlp_bwd):  # the forward's vocab splits and the backward's dW splits
        monkeypatch.setattr(module, "num_programs_target", lambda device: MANY_PROGRAMS)
    with backend.use_backend("triton"):
        yield


def _budget(monkeypatch, n_rows, chunk_v, elem=4):
    monkeypatch.setattr(tlp_bwd, "DZ_CHUNK_BYTES", n_rows * chunk_v * elem)


def _plan(n, H, V, deterministic=True, dtype=torch.float32):
    return tlp_bwd.backward_plan(n, V, H, dtype, MANY_PROGRAMS, deterministic)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("N,H,V,temperature,bias,entropy", [(37, 31, 123, 1.0, False, False),
                                                           (150, 20, 1000, 0.7, True, True)])
def test_backward_against_reference(N, H, V, temperature, bias, entropy, deterministic, monkeypatch):
    """d_hidden, d_weight, d_bias against the fp64 reference (criterion of kernel_testing), with ragged N (37, 150:
    not multiples of any BLOCK_M), ragged V (123, 1000: not multiples of a tile or of the chunk), 20% ignored rows."""
    monkeypatch.setenv("DASH_KERNELS_DETERMINISTIC", "1" if deterministic else "0")
    hidden, weight, targets, b = linear_inputs(N, H, V, seed=V, bias=bias, ignore_frac=0.2)
    n_live = int((targets != -100).sum())
    _budget(monkeypatch, n_live, 2 * SMALL_ALIGN)  # [n, 128] dz chunks: 1 or 8 chunks, the last one ragged
    plan = _plan(n_live, H, V, deterministic)
    assert plan.n_chunks == -(-V // 128) and (N < 100 or plan.dw_splits >= 3), plan
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)]
    run = logprob_runner(hidden, weight, targets, b, temperature, entropy, upstream)
    _, g_ours = run(token_logprobs)
    _, g_naive = run(token_logprobs_ref, torch.float32)
    _, g_naive2 = run(naive_alt_logprobs, torch.float32)
    _, g_ref = run(token_logprobs_ref, torch.float64)
    for name, a, n, n2, r in zip(("d_hidden", "d_weight", "d_bias"), g_ours, g_naive, g_naive2, g_ref):
        if r is not None:
            assert a is not None and a.dtype == torch.float32, name
            assert_close_to_ref(name, a, [n, n2], r)


# The forward does run on the poisoned rows (they are valid targets), so its max over a NaN row warns.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_rows_without_gradient_are_skipped(monkeypatch):
    """Rows whose upstream gradient is exactly 0 never reach the backward kernels: their hidden states are NaN here,
    which any GEMM that read them would spread into d_weight; their d_hidden rows stay exactly 0."""
    N, H, V = 45, 24, 300
    _budget(monkeypatch, N, 128)
    hidden, weight, targets, _ = linear_inputs(N, H, V, seed=5)
    skipped = torch.zeros(N, dtype=torch.bool)
    skipped[::3] = True
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    upstream[skipped] = 0.0
    poisoned = hidden.clone()
    poisoned[skipped] = float("nan")
    launches = []
    kernel = tlp_bwd._token_logprobs_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(args[10])  # n_rows
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(tlp_bwd, "_token_logprobs_bwd_kernel", Spy())
    h = poisoned.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    (token_logprobs(h, w, targets) * upstream.float()).sum().backward()
    assert launches and set(launches) == {int((~skipped).sum())}
    assert (h.grad[skipped] == 0).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    # The same gradient from the fp64 reference on the live rows alone.
    h64 = hidden[~skipped].double().requires_grad_()
    w64 = weight.double().requires_grad_()
    (token_logprobs_ref(h64, w64, targets[~skipped], dtype=torch.float64) * upstream[~skipped]).sum().backward()
    h32 = hidden[~skipped].clone().requires_grad_()
    w32 = weight.clone().requires_grad_()
    (token_logprobs_ref(h32, w32, targets[~skipped]) * upstream[~skipped].float()).sum().backward()
    assert_close_to_ref("d_hidden", h.grad[~skipped], h32.grad, h64.grad)
    assert_close_to_ref("d_weight", w.grad, w32.grad, w64.grad)


def _reversed_program_order(monkeypatch):
    """The interpreter runs programs in grid order; this makes it run them in the reverse order (x, y, z ->
    nx-1-x, ...), as a GPU is free to: a result that depends on which program finishes first changes."""
    builder = interpreter.interpreter_builder
    dims = {}
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def grid_dim(nx, ny, nz):
        dims["n"] = (nx, ny, nz)
        set_dim(nx, ny, nz)

    def grid_idx(x, y, z):
        nx, ny, nz = dims["n"]
        set_idx(nx - 1 - x, ny - 1 - y, nz - 1 - z)

    monkeypatch.setattr(builder, "set_grid_dim", grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", grid_idx)


def _grads(hidden, weight, bias, targets, upstream):
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    logp, ent = token_logprobs(h, w, targets, 0.9, bias=b, return_entropy=True)
    ((logp * upstream[0]).sum() + (ent * upstream[1]).sum()).backward()
    return h.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_is_bitwise_under_any_program_order(dtype, monkeypatch):
    """DASH_KERNELS_DETERMINISTIC=1: two runs, and a third with every grid run in reverse program order, give
    bitwise-identical d_hidden, d_weight, d_bias (3 vocab chunks, S >= 3 dW splits). The default mode's relaxed
    atomics do not (checked in fp32, so the reordering is known to reach the dW adds), yet stay within fp32
    rounding of the ordered sums."""
    N, H, V = 150, 20, 300
    elem = 2 if dtype == torch.bfloat16 else 4
    _budget(monkeypatch, N, 128, elem)
    plan = _plan(N, H, V, dtype=dtype)
    assert plan.n_chunks == 3 and plan.dw_splits >= 3, plan  # 5 splits of 32 rows in fp32, 3 of 64 in bf16
    hidden, weight, targets, bias = (t if t is None or not t.is_floating_point() else t.to(dtype)
                                     for t in linear_inputs(N, H, V, seed=11, bias=True))
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(N, generator=g), torch.randn(N, generator=g)]
    monkeypatch.setenv("DASH_KERNELS_DETERMINISTIC", "1")
    first = _grads(hidden, weight, bias, targets, upstream)
    second = _grads(hidden, weight, bias, targets, upstream)
    with monkeypatch.context() as m:
        _reversed_program_order(m)
        reordered = _grads(hidden, weight, bias, targets, upstream)
        if dtype == torch.float32:
            m.setenv("DASH_KERNELS_DETERMINISTIC", "0")
            atomic_reordered = _grads(hidden, weight, bias, targets, upstream)
    for name, a, b, c in zip(("d_hidden", "d_weight", "d_bias"), first, second, reordered):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name} differs between runs in deterministic mode"
    if dtype == torch.float32:
        monkeypatch.setenv("DASH_KERNELS_DETERMINISTIC", "0")
        atomic = _grads(hidden, weight, bias, targets, upstream)
        assert torch.equal(atomic[0], first[0])  # d_hidden has no atomics in either mode
        assert not torch.equal(atomic_reordered[1], atomic[1]), "program order never reached the atomic dW adds"
        for name, a, b in zip(("d_weight", "d_bias"), atomic_reordered[1:], first[1:]):
            tol = 8 * torch.finfo(torch.float32).eps * b.abs().amax()
            assert (a - b).abs().max() <= tol, name
