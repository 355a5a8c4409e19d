"""nn.Module wrappers, and the backend choice (environment variable, override)."""

import os
import subprocess
import sys

import pytest
import torch
from kernel_testing import loss_inputs
from torch import nn

from dash_kernels import fused_policy_loss, token_logprobs
from dash_kernels.modules import FusedPolicyLoss, LinearLogprobs


def test_fused_policy_loss_module_equals_function(torch_backend):
    inp = loss_inputs(3, 6, 16, 50, seed=3)
    module = FusedPolicyLoss(loss_type="grpo", beta=0.05, adv_threshold=0.1)
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["advantages"], inp["mask"], inp["old_logp"],
            inp["ref_logp"])
    a, ma = module(*args, normalizer=7.0)
    b, mb = fused_policy_loss(*args, loss_type="grpo", beta=0.05, adv_threshold=0.1, normalizer=7.0)
    assert torch.equal(a, b) and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert "loss_type=grpo" in repr(module) and not list(module.parameters())


def test_linear_logprobs_module(torch_backend):
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=True)
    hidden = torch.randn(2, 5, 16)
    targets = torch.randint(0, 40, (2, 5))
    logp = LinearLogprobs(head, temperature=0.8)(hidden, targets)
    ref = torch.log_softmax(head(hidden) / 0.8, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logp, ref, atol=1e-5)
    logp.sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    with pytest.raises(ValueError, match="head must be an nn.Linear"):
        LinearLogprobs(nn.Embedding(4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("env,expected", [("reference", "reference"), ("torch", "torch"), ("", "torch")])
def test_backend_from_environment(env, expected):
    code = "import dash_kernels.backend as b, torch; print(b.resolve(torch.device('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, DASH_KERNELS_BACKEND=env), check=True).stdout.strip()
    assert out == expected


@pytest.mark.slow
def test_bad_backend_environment_is_an_error():
    proc = subprocess.run([sys.executable, "-c", "import dash_kernels"], capture_output=True, text=True,
                          env=dict(os.environ, DASH_KERNELS_BACKEND="cuda"), check=False)
    assert proc.returncode != 0 and "DASH_KERNELS_BACKEND must be one of" in proc.stderr


def test_override_switches_paths_on_the_same_inputs():
    from dash_kernels import backend
    inp = loss_inputs(2, 4, 8, 30, seed=1)
    outs = {}
    for name in ("torch", "reference"):
        with backend.use_backend(name):
            outs[name] = token_logprobs(inp["hidden"], inp["weight"], inp["targets"])
    assert torch.allclose(outs["torch"], outs["reference"], atol=1e-5)


def test_triton_launchers_run_on_their_tensors_cuda_device(monkeypatch):
    """Triton launches on the *current* CUDA device: every launcher is wrapped by on_tensor_device, which makes the
    first tensor argument's device current. No GPU here: a tensor subclass claims to live on cuda:1 and
    torch.cuda.device is replaced by a recorder."""
    import contextlib

    from dash_kernels import _ext, paged_attention, rms_norm, rotary, sample_rows, silu_mul
    from dash_kernels.ops import logprobs_from_logits, policy_loss, token_logprobs, token_logprobs_bwd

    launchers = [paged_attention.paged_attention_fwd, rms_norm.rms_norm_fwd, rotary.rotary_fwd,
                 sample_rows.sample_rows_fwd, silu_mul.silu_mul_fwd, logprobs_from_logits.logprobs_from_logits_fwd,
                 logprobs_from_logits.logprobs_from_logits_bwd, policy_loss.policy_coef,
                 token_logprobs.token_logprobs_fwd, token_logprobs_bwd.token_logprobs_bwd]
    assert all(getattr(f, "__wrapped__", None) is not None for f in launchers)  # functools.wraps of the decorator

    class OnCuda1(torch.Tensor):
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 1))

    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []
    launch = _ext.on_tensor_device(lambda *a, **k: seen.append(len(entered)) or "out")
    assert launch(3, torch.zeros(2).as_subclass(OnCuda1), torch.zeros(1)) == "out"
    assert entered == [torch.device("cuda", 1)] and seen == [1]  # the launcher ran inside the guard
    assert launch(torch.zeros(2), key=torch.zeros(1).as_subclass(OnCuda1)) == "out"  # first tensor: a CPU one
    assert entered == [torch.device("cuda", 1)] and seen == [1, 1]
