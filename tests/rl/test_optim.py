"""fp32 master weights for 16-bit models: the update bf16 AdamW loses, and exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from dash.rl.optim import MasterWeightAdamW, make_adamw

PAPER_LR = 3e-6  # the paper's lr: far below a bf16 weight's spacing (~1e-4 at magnitude 0.02)
INIT_STD = 0.02  # typical transformer init / trained-weight scale
STEPS = 10


def _bf16_param(seed: int = 0, n: int = 4096) -> torch.nn.Parameter:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(n, generator=g) * INIT_STD).to(torch.bfloat16))


def _grad(n: int = 4096) -> torch.Tensor:
    """A steady gradient direction, exactly representable in bf16 (so both optimizers see the same numbers)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, generator=g).to(torch.bfloat16)


def _run(opt, p, steps):
    for _ in range(steps):
        p.grad = _grad(p.numel()).to(p.dtype)
        opt.step()
        opt.zero_grad()


def test_master_weights_follow_the_fp32_trajectory_where_bf16_adamw_stalls():
    p_master, p_plain = _bf16_param(), _bf16_param()
    ref = torch.nn.Parameter(_bf16_param().detach().float())
    _run(MasterWeightAdamW([p_master], lr=PAPER_LR, weight_decay=0.0), p_master, STEPS)
    _run(torch.optim.AdamW([p_plain], lr=PAPER_LR, weight_decay=0.0), p_plain, STEPS)
    _run(torch.optim.AdamW([ref], lr=PAPER_LR, weight_decay=0.0), ref, STEPS)
    start = _bf16_param()
    # The master run's bf16 weights are the fp32 reference rounded once: bitwise.
    assert torch.equal(p_master.detach(), ref.detach().to(torch.bfloat16))
    moved_master = (p_master.detach() != start.detach()).float().mean().item()
    moved_plain = (p_plain.detach() != start.detach()).float().mean().item()
    # fp32 moves every weight by ~STEPS * lr = 3e-5; rounding to bf16 keeps a share of those moves visible, while
    # plain bf16 AdamW rounds each single ~3e-6 step away (the failure this optimizer exists for).
    assert moved_plain < 0.10 < moved_master, (moved_plain, moved_master)


def test_state_dict_round_trip_resumes_bitwise():
    p_a = _bf16_param()
    opt_a = MasterWeightAdamW([p_a], lr=1e-3, weight_decay=0.01)
    _run(opt_a, p_a, 3)
    state = copy.deepcopy(opt_a.state_dict())  # torch's state_dict holds live references to the moments
    _run(opt_a, p_a, 3)

    p_b = _bf16_param(seed=5)  # different weights: everything must come from the state dict
    opt_b = MasterWeightAdamW([p_b], lr=1e-3, weight_decay=0.01)
    opt_b.load_state_dict(state)
    _run(opt_b, p_b, 3)
    assert torch.equal(p_a.detach(), p_b.detach())
    assert torch.equal(opt_a.masters[0], opt_b.masters[0])


def test_scheduler_drives_the_master_lr():
    p = _bf16_param()
    opt = MasterWeightAdamW([p], lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** (i + 1))
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    _run(opt, p, 1)
    sched.step()  # after an optimizer step: no "scheduler before optimizer" warning, i.e. torch sees our step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_make_adamw_picks_by_dtype_and_plain_state_is_refused():
    fp32 = torch.nn.Parameter(torch.zeros(3))
    assert type(make_adamw([fp32], lr=1e-3, weight_decay=0.0)) is torch.optim.AdamW
    opt = make_adamw([_bf16_param()], lr=1e-3, weight_decay=0.0)
    assert isinstance(opt, MasterWeightAdamW)
    plain_state = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4096))], lr=1e-3).state_dict()
    with pytest.raises(ValueError, match="no fp32 master weights"):
        opt.load_state_dict(plain_state)


def test_micro_batch_gradients_accumulate_in_fp32():
    """Gradients of K backward passes into a bf16 parameter are summed in fp32 on the master (each pass's gradient is
    bf16, as autograd makes it; their sum is not rounded after every addition), and the parameter's .grad is cleared
    so nothing is counted twice; gradient_tensors names the masters for the all-reduce and the clipping."""
    from dash.rl.optim import gradient_tensors

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096).bfloat16())
    opt = MasterWeightAdamW([p], lr=1e-3, weight_decay=0.0)
    model = torch.nn.Module()
    model.p = p
    assert gradient_tensors(opt, model) == opt.masters
    parts = [torch.randn(4096) for _ in range(32)]
    for c in parts:
        (p.float() * c).sum().backward()  # d/dp = c, delivered to the bf16 leaf as bf16(c)
        assert p.grad is None  # moved to the master by the hook
    exact = torch.stack([c.bfloat16().double() for c in parts]).sum(0)  # [4096] the bf16 parts, summed exactly
    ours = opt.masters[0].grad.double()
    assert (ours - exact).abs().max() < 1e-5 * exact.abs().max()  # fp32 summation of 32 terms
    bf16_sum = torch.zeros(4096, dtype=torch.bfloat16)
    for c in parts:
        bf16_sum += c.bfloat16()
    assert (bf16_sum.double() - exact).abs().max() > 100 * (ours - exact).abs().max()  # what accumulating in p.grad did
    opt.step()
    opt.zero_grad()
    assert opt.masters[0].grad is None and p.grad is None
