"""Bad input is a ValueError naming the argument; fp64 gradcheck of the torch path's hand-written gradients."""

import pytest
import torch

from dash_kernels import backend, fused_policy_loss, token_logprobs, token_logprobs_from_logits
from dash_kernels.ops import _chunked


def _lin(N=6, H=4, V=10):
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


@pytest.mark.parametrize("make,match", [
    (lambda h, w, t: (h, w[:, :3], t), r"hidden \[\.\.\., H\] and weight \[V, H\] disagree on H"),
    (lambda h, w, t: (h, w, t[:4]), r"targets must have shape \(6,\)"),
    (lambda h, w, t: (h, w, t.float()), r"targets must be an integer tensor"),
    (lambda h, w, t: (h, w.double(), t), r"weight dtype torch.float64 differs from hidden dtype torch.float32"),
    (lambda h, w, t: (h, w, t.clone().fill_(10)), r"targets \(shape \(6,\)\) has values outside \[0, 10\)"),
    (lambda h, w, t: (h, w, t.clone().fill_(-5)), r"outside \[0, 10\) that are not ignore_index=-100, e.g. -5"),
    (lambda h, w, t: (h, w[0], t), r"weight must have 2 dimensions, got shape \(4,\)"),
    (lambda h, w, t: (h.int(), w, t), r"hidden must be floating point"),
    (lambda h, w, t: (h, w.to("meta"), t), r"weight is on meta but hidden is on cpu"),
])
def test_token_logprobs_bad_input(torch_backend, make, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(*make(*_lin()))


def test_token_logprobs_bad_scalars(torch_backend):
    h, w, t = _lin()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        token_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        token_logprobs(h, w, t, bias=torch.zeros(9))


def test_from_logits_bad_input(torch_backend):
    z = torch.randn(5, 7)
    with pytest.raises(ValueError, match=r"targets must have shape \(5,\)"):
        token_logprobs_from_logits(z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values outside \[0, 7\)"):
        token_logprobs_from_logits(z, torch.full((5,), 7))


def _loss_args(B=2, L=3, H=4, V=10):
    return {"hidden": torch.randn(B, L, H), "weight": torch.randn(V, H), "targets": torch.randint(0, V, (B, L)),
                "advantages": torch.randn(B), "mask": torch.ones(B, L, dtype=torch.bool)}


@pytest.mark.parametrize("change,match", [
    ({"advantages": torch.randn(3)}, r"advantages must have shape \(2,\) or \(2, 3\), got shape \(3,\)"),
    ({"mask": torch.ones(2, 4)}, r"mask must have shape \(2, 3\)"),
    ({"old_logp": torch.zeros(3, 2)}, r"old_logp must have shape \(2, 3\)"),
    ({"hidden": torch.randn(6, 4), "targets": torch.zeros(6, dtype=torch.long)}, r"hidden must have 3 dimensions"),
    ({"loss_type": "ppo"}, r"loss_type must be one of"),
    ({"beta": 0.1}, r"beta != 0 needs ref_logp"),
    ({"normalizer": 0}, r"normalizer must be > 0"),
    ({"advantages": torch.randn(2).to("meta")}, r"advantages is on meta but hidden is on cpu"),
])
def test_fused_loss_bad_input(torch_backend, change, match):
    args = _loss_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fused_policy_loss(**args)


def test_forcing_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with backend.use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        token_logprobs(*_lin())
    with pytest.raises(ValueError, match="backend must be one of"), backend.use_backend("cuda"):
        pass


# --------------------------------------------------------------------------------------------------- gradcheck
@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(_chunked, "_CHUNK_BYTES", 1)  # 16-row chunks: N = 20 crosses a chunk boundary
    monkeypatch.setattr(_chunked, "_SCRATCH_BYTES", 3 * 4 * 11)  # 3-row scratch tiles at V = 11


def test_gradcheck_token_logprobs(torch_backend, tiny_chunks):
    g = torch.Generator().manual_seed(0)
    N, H, V = 20, 5, 11
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[3] = -100
    assert torch.autograd.gradcheck(lambda h, w, b: token_logprobs(h, w, t, 0.8, b, True), (h, w, b), fast_mode=True)


def test_gradcheck_from_logits(torch_backend):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (7,), generator=g)
    t[0] = -100
    assert torch.autograd.gradcheck(lambda z: token_logprobs_from_logits(z, t, 1.3, True), (z,), fast_mode=True)


@pytest.mark.parametrize("kw", [{"loss_type": "grpo", "beta": 0.2, "entropy_coef": 0.05, "temperature": 0.9,
                                     "kl_bias_correction": True},
                                {"loss_type": "dapo", "delta": 1.1, "adv_threshold": 0.1, "eps_high": 0.3}])
def test_gradcheck_fused_loss(torch_backend, tiny_chunks, kw):
    g = torch.Generator().manual_seed(2)
    B, L, H, V = 4, 5, 4, 9
    h = torch.randn(B, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (B, L), generator=g)
    adv = torch.randn(B, L, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L, generator=g) > 0.2
    with torch.no_grad():
        from dash_kernels.reference import token_logprobs_ref
        logp = token_logprobs_ref(h, w, t, kw.get("temperature", 1.0), b, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)

    def f(h, w, b):
        return fused_policy_loss(h, w, t, adv, mask, old, ref, bias=b, **kw)[0]

    assert torch.autograd.gradcheck(f, (h, w, b), fast_mode=True)
