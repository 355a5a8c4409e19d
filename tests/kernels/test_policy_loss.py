"""fused_policy_loss on the chunked torch backend vs the fp64 reference, plus the loss semantics themselves."""

import pytest
import torch
from kernel_testing import assert_finite, check_loss_against_ref, loss_inputs

from dash_kernels import fused_policy_loss, policy_loss
from dash_kernels.ops import _chunked
from dash_kernels.reference import fused_policy_loss_ref, loss_token_weights

SETTINGS = [
    {"loss_type": "dapo"},
    {"loss_type": "dapo", "adv_threshold": 0.1, "temperature": 0.7},
    {"loss_type": "grpo", "beta": 0.04, "adv_threshold": 0.1},
    {"loss_type": "bnpo", "beta": 0.1, "entropy_coef": 0.01, "eps_high": 0.28},
    {"loss_type": "grpo", "beta": 0.1, "kl_bias_correction": True, "delta": 1.3},
    {"loss_type": "dr_grpo", "delta": 1.5, "max_completion_length": 16, "temperature": 1.3},
    {"loss_type": "dapo", "normalizer": 57.0, "entropy_coef": 0.02, "adv_threshold": 0.0},
]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("V,bias,per_token_adv", [(123, False, False), (1000, True, True)])
def test_fused_loss_matches_reference(torch_backend, chunking, kw, V, bias, per_token_adv):
    inp = loss_inputs(3, 13, 31, V, seed=V, bias=bias, per_token_adv=per_token_adv)
    check_loss_against_ref(fused_policy_loss, inp, **kw)


@pytest.mark.slow
def test_fused_loss_realistic_vocab(torch_backend):
    inp = loss_inputs(4, 10, 64, 151936, seed=5)
    check_loss_against_ref(fused_policy_loss, inp, loss_type="dapo", beta=0.04, adv_threshold=0.1)


def test_old_logp_none_is_on_policy(torch_backend):
    inp = loss_inputs(3, 7, 16, 50, seed=2)
    inp["old_logp"] = None
    _, _, metrics = check_loss_against_ref(fused_policy_loss, inp, loss_type="grpo")
    assert float(metrics["loss/clip_frac"]) == 0.0  # ratio is exactly 1


def test_filtered_rows_are_never_computed(torch_backend, monkeypatch):
    """Rows that are masked, filtered by |A| <= threshold, or carry A = 0 with beta = 0 skip forward and backward."""
    inp = loss_inputs(4, 6, 16, 80, seed=4, zero_adv_frac=0.0)
    inp["advantages"] = torch.tensor([1.0, 0.0, 0.05, -2.0])
    inp["mask"][:] = True
    seen = []
    real = _chunked.sweep
    monkeypatch.setattr(_chunked, "sweep", lambda *a, **k: seen.append(a[4].tolist()) or real(*a, **k))
    h = inp["hidden"].clone().requires_grad_()
    loss, metrics = fused_policy_loss(h, inp["weight"], inp["targets"], inp["advantages"], inp["mask"],
                                      inp["old_logp"], adv_threshold=0.1)
    loss.backward()
    assert seen == [list(range(6)) + list(range(18, 24))]  # sequences 0 and 3 only, one sweep (fwd+bwd)
    assert (h.grad[1:3] == 0).all() and h.grad[0].abs().sum() > 0
    assert float(metrics["loss/kept_frac"]) == pytest.approx(0.5)
    assert float(metrics["loss/active_frac"]) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_all_filtered_batch(torch_backend, beta):
    inp = loss_inputs(3, 5, 16, 40, seed=6)
    inp["advantages"] = torch.tensor([0.01, -0.02, 0.0])
    h = inp["hidden"].clone().requires_grad_()
    w = inp["weight"].clone().requires_grad_()
    loss, metrics = fused_policy_loss(h, w, inp["targets"], inp["advantages"], inp["mask"], inp["old_logp"],
                                      inp["ref_logp"], beta=beta, adv_threshold=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert (h.grad == 0).all() and (w.grad == 0).all()
    for k, v in metrics.items():
        assert torch.isfinite(v), k
    assert float(metrics["loss/kept_frac"]) == 0.0


def test_all_masked_rows_and_garbage_in_padding(torch_backend):
    """Masked positions may hold NaN/inf old or ref log-probs (padding): nothing leaks into loss or gradients."""
    inp = loss_inputs(4, 12, 16, 40, seed=7)  # enough live rows for the max-error statistics to mean something
    inp["mask"][0] = False  # a fully masked sequence
    inp["mask"][2, 7:] = False
    for key in ("old_logp", "ref_logp"):
        inp[key][~inp["mask"]] = float("nan")
        inp[key][0, 0] = float("-inf")
    inp["targets"][2, 5] = -100
    inp["targets"][3, 2] = -100
    _, grads, _ = check_loss_against_ref(fused_policy_loss, inp, loss_type="grpo", beta=0.1)
    assert (grads[0][0] == 0).all()
    for g in grads:
        if g is not None:
            assert_finite("grad", g)


def test_single_token_sequences(torch_backend):
    inp = loss_inputs(5, 1, 16, 77, seed=8, mask_frac=0.0)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        check_loss_against_ref(fused_policy_loss, inp, loss_type=loss_type, beta=0.05)


@pytest.mark.parametrize("B,L", [(0, 4), (3, 0)])
def test_empty_batch(torch_backend, B, L):
    h = torch.randn(B, L, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    loss, metrics = fused_policy_loss(h, w, torch.zeros(B, L, dtype=torch.long), torch.zeros(B),
                                      torch.ones(B, L, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and (w.grad == 0).all() and h.grad.shape == h.shape
    assert all(torch.isfinite(v) for v in metrics.values())


def test_no_grad_forward_matches(torch_backend):
    inp = loss_inputs(3, 7, 16, 60, seed=9)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["advantages"], inp["mask"], inp["old_logp"],
            inp["ref_logp"])
    with torch.no_grad():
        a, ma = fused_policy_loss(*args, beta=0.1, entropy_coef=0.01)
    b, mb = fused_policy_loss(inp["hidden"].requires_grad_(), *args[1:], beta=0.1, entropy_coef=0.01)
    assert torch.allclose(a, b.detach(), rtol=1e-6, atol=1e-9)
    assert all(torch.allclose(ma[k], mb[k]) for k in ma)


def test_grad_scale_and_frozen_weight(torch_backend):
    """Upstream gradient != 1 scales every gradient; a frozen lm_head gets none (and its dW GEMM is skipped)."""
    inp = loss_inputs(2, 5, 16, 40, seed=10)
    h = inp["hidden"].clone().requires_grad_()
    loss, _ = fused_policy_loss(h, inp["weight"], inp["targets"], inp["advantages"], inp["mask"], inp["old_logp"])
    (3.0 * loss).backward()
    h2 = inp["hidden"].clone().requires_grad_()
    loss2, _ = fused_policy_loss(h2, inp["weight"], inp["targets"], inp["advantages"], inp["mask"], inp["old_logp"])
    loss2.backward()
    assert torch.allclose(h.grad, 3.0 * h2.grad)


# ---------------------------------------------------------------------------------------------- loss semantics
def _trl_loss(logp, old, adv, mask, ref, loss_type, beta, eps_low=0.2, eps_high=0.2, max_len=None, n_items=None,
              bias_corr=False):
    """TRL GRPOTrainer._compute_loss (token-level importance sampling), written out independently."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    if beta:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + beta * (kl * coef_1 if bias_corr else kl)
    mask = mask.float()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len)
    return (per_token * mask).sum() / n_items


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,bias_corr", [(0.0, False), (0.04, False), (0.04, True)])
def test_reference_matches_trl_formulas(loss_type, beta, bias_corr):
    g = torch.Generator().manual_seed(11)
    B, L = 4, 9
    logp = (-torch.rand(B, L, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > 0.3
    n_items = 50.0
    kw = {"max_completion_length": 12} if loss_type == "dr_grpo" else {}
    ours, _ = policy_loss(logp, old, adv, mask, ref, loss_type=loss_type, beta=beta, kl_bias_correction=bias_corr,
                          normalizer=n_items if loss_type == "dapo" else None, **kw)
    trl = _trl_loss(logp, old, adv, mask, ref, loss_type, beta, max_len=12, n_items=n_items, bias_corr=bias_corr)
    g_ours, = torch.autograd.grad(ours, logp)
    g_trl, = torch.autograd.grad(trl, logp)
    assert torch.allclose(ours, trl, rtol=1e-12, atol=1e-14)
    assert torch.allclose(g_ours, g_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_filtering_with_beta_zero_leaves_gradient_unchanged(loss_type):
    """With beta = 0, samples with A = 0 contribute no gradient, so filtering them (which keeps them in every
    denominator) changes nothing; with beta > 0 it drops their KL term."""
    g = torch.Generator().manual_seed(12)
    logp = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, 0.0, -0.5, 0.0], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    grads = {}
    for thr in (None, 0.1):
        for beta in (0.0, 0.1):
            loss, _ = policy_loss(logp, old, adv, mask, ref, loss_type=loss_type, beta=beta, adv_threshold=thr)
            grads[thr, beta], = torch.autograd.grad(loss, logp)
    assert torch.equal(grads[None, 0.0], grads[0.1, 0.0])
    assert not torch.allclose(grads[None, 0.1], grads[0.1, 0.1])
    assert (grads[0.1, 0.1][[1, 3]] == 0).all()  # filtered samples: no PG and no KL


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_accumulation_with_normalizer_equals_one_big_batch(torch_backend, loss_type):
    """Uneven, filtered micro-batches with the step's normaliser sum to the one-big-batch gradient, fused path."""
    inp = loss_inputs(6, 8, 16, 90, seed=13)
    inp["mask"][4, 2:] = False  # uneven lengths
    kw = {"loss_type": loss_type, "adv_threshold": 0.1, "beta": 0.04}
    B = 6
    mask = inp["mask"] & (inp["targets"] != -100)
    step_norm = {"grpo": B, "bnpo": mask.sum().item(), "dapo": mask.sum().item(), "dr_grpo": B * 8}[loss_type]

    def grads(rows):
        h = inp["hidden"][rows].clone().requires_grad_()
        w = inp["weight"].clone().requires_grad_()
        loss, _ = fused_policy_loss(h, w, inp["targets"][rows], inp["advantages"][rows], inp["mask"][rows],
                                    inp["old_logp"][rows], inp["ref_logp"][rows], normalizer=step_norm, **kw)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    big = grads(slice(0, 6))
    parts = [grads(slice(0, 1)), grads(slice(1, 4)), grads(slice(4, 6))]
    assert torch.allclose(sum(p[0] for p in parts), big[0], atol=1e-6)
    assert torch.allclose(torch.cat([p[1] for p in parts]), big[1], atol=1e-6)
    assert torch.allclose(sum(p[2] for p in parts), big[2], atol=1e-6)
    # and the default (local) normaliser of one big batch is exactly that step normaliser
    loss_default, _ = fused_policy_loss(inp["hidden"], inp["weight"], inp["targets"], inp["advantages"],
                                        inp["mask"], inp["old_logp"], inp["ref_logp"], **kw)
    assert torch.allclose(loss_default, big[0], atol=1e-6)


def test_loss_token_weights_denominators():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 0.05])
    kept, w = loss_token_weights(mask, adv, "grpo", adv_threshold=0.1)
    assert kept.tolist() == [[True, True, False], [False, False, False]]
    assert torch.allclose(w[0], torch.tensor([0.25, 0.25, 0.0]))  # 1 / (len 2 * 2 sequences)
    _, w = loss_token_weights(mask, adv, "bnpo")
    assert torch.allclose(w, mask.float() / 3)
    _, w = loss_token_weights(mask, adv, "dr_grpo", max_completion_length=10)
    assert torch.allclose(w, mask.float() / 20)
    _, w = loss_token_weights(mask, adv, "dapo", normalizer=torch.tensor(30.0))
    assert torch.allclose(w, mask.float() / 30)


def test_reference_backend_is_the_reference():
    from dash_kernels import backend
    inp = loss_inputs(2, 4, 8, 30, seed=14)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["advantages"], inp["mask"], inp["old_logp"])
    with backend.use_backend("reference"):
        a, _ = fused_policy_loss(*args, loss_type="grpo")
    b, _ = fused_policy_loss_ref(*args, loss_type="grpo")
    assert torch.equal(a, b)
