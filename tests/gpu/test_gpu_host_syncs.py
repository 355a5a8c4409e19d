"""Decode steps on CUDA wait for the device only once: the copy of the sampled tokens (issue 22 item 5, GPU side).

torch.cuda.set_sync_debug_mode("error") turns every synchronizing CUDA call (`.item()`, `.cpu()` of a device
tensor, `nonzero`, a boolean-mask index, a blocking copy) into a RuntimeError. It is switched on inside
`ModelRunner.run` and the sampler's `_sample` of every decode step, i.e. from the step's start up to (not including)
`generate`'s device-to-host copy of the tokens and log-probs, with the presets' sampling settings (top-k 50 in the
fused Triton sampler, a min-tokens stop mask). Prefill steps are not checked (their varlen metadata is built on the
host). The CPU side is tests/engine/test_host_syncs.py.
"""

import pytest
import torch

import dash.engine.generation as sampler_mod
from dash.engine import SamplingParams, generate
from dash.engine.runner import ModelRunner
from tests.engine.conftest import build_pair, random_prompts

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
PARAMS = SamplingParams(temperature=0.9, top_k=50, min_new_tokens=3, max_new_tokens=12, seed=3, stop_token_ids=[2])


@pytest.fixture
def sync_checked_decode_steps(monkeypatch):
    """Decode steps run under set_sync_debug_mode("error"); returns the list that counts them."""
    steps = []
    run, sample = ModelRunner.run, sampler_mod._sample

    def checked(fn):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def run_checked(self, ctx):
        if ctx.is_prefill:
            return run(self, ctx)
        steps.append(1)
        logits = checked(lambda: run(self, ctx))
        logits.decode_step = True  # marks the logits _sample below must check
        return logits

    def sample_checked(table, batch, logits):
        if not getattr(logits, "decode_step", False):
            return sample(table, batch, logits)
        return checked(lambda: sample(table, batch, logits))

    monkeypatch.setattr(ModelRunner, "run", run_checked)
    monkeypatch.setattr(sampler_mod, "_sample", sample_checked)
    return steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_do_not_sync(dtype, sync_checked_decode_steps, tmp_path):
    _, model = build_pair("qwen2", tmp_path)
    model = model.to(device=CUDA, dtype=dtype)
    outs = generate(model, None, random_prompts([5, 17, 9]), n=2, params=PARAMS, page_size=16)
    assert len(sync_checked_decode_steps) >= PARAMS.max_new_tokens - 1
    assert all(len(c.token_ids) >= PARAMS.min_new_tokens for group in outs for c in group)


def test_the_check_catches_an_inserted_item(sync_checked_decode_steps, tmp_path, monkeypatch):
    """The check can fail: an `.item()` on the logits inside the sampling call raises."""
    fused = sampler_mod.sample_rows

    def with_item(logits, *args, **kwargs):
        logits.max().item()
        return fused(logits, *args, **kwargs)

    monkeypatch.setattr(sampler_mod, "sample_rows", with_item)
    _, model = build_pair("qwen2", tmp_path)
    with pytest.raises(RuntimeError, match="synchroniz"):
        generate(model.to(CUDA), None, random_prompts([5]), params=PARAMS, page_size=16)
