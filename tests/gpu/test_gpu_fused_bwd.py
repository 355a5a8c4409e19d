"""The fused-loss backward's deterministic mode on a CUDA device: bitwise-identical gradients run to run.

The CPU side (tests/kernels/interp_fused_bwd_cases.py) shows the same under the interpreter with the programs run in
reverse order; here real GPU scheduling decides the order. The dW reduction is forced into S > 2 row splits (the
only place the default mode uses atomics) by asking for many programs, on a bf16 Qwen2.5-0.5B-shaped head.
"""

import pytest
import torch

from dash_kernels import token_logprobs
from dash_kernels.ops import token_logprobs as tlp_module
from dash_kernels.ops import token_logprobs_bwd as tlp_bwd_module

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
N, H, V = 4096, 896, 151936
MANY_PROGRAMS = 100_000  # S = MAX_DW_SPLITS dW splits
RUNS = 3


def _grads():
    g = torch.Generator(device=CUDA).manual_seed(0)
    hidden = torch.randn(N, H, generator=g, device=CUDA).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=CUDA) * (3.0 / H ** 0.5)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g, device=CUDA)
    upstream = torch.randn(N, generator=g, device=CUDA)
    logp, ent = token_logprobs(hidden, weight, targets, return_entropy=True)
    ((logp * upstream).sum() + ent.sum()).backward()
    return hidden.grad, weight.grad


def test_deterministic_mode_is_bitwise_run_to_run(monkeypatch):
    for module in (tlp_module, tlp_bwd_module):  # the forward's vocab splits and the backward's dW splits
        monkeypatch.setattr(module, "num_programs_target", lambda device: MANY_PROGRAMS)
    plan = tlp_bwd_module.backward_plan(N, V, H, torch.bfloat16, MANY_PROGRAMS, True)
    assert plan.dw_splits == tlp_bwd_module.MAX_DW_SPLITS and plan.n_chunks > 1, plan
    monkeypatch.setenv("DASH_KERNELS_DETERMINISTIC", "1")
    runs = [_grads() for _ in range(RUNS)]
    for dh, dw in runs[1:]:
        assert torch.equal(dh, runs[0][0]) and torch.equal(dw, runs[0][1])
    # The default mode (relaxed atomic adds of the S partials) agrees to within the rounding of bf16 dW.
    monkeypatch.setenv("DASH_KERNELS_DETERMINISTIC", "0")
    dh, dw = _grads()
    assert torch.equal(dh, runs[0][0])  # dH has no atomics in either mode
    ulp = torch.finfo(torch.bfloat16).eps * runs[0][1].float().abs()
    assert ((dw.float() - runs[0][1].float()).abs() <= ulp + 1e-30).all()
