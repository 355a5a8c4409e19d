"""The decode step's hot path reads nothing of the step's tensors back to the host (issue 22 item 5, CPU side).

On CUDA every `.item()`, `.cpu()`, `.tolist()`, `nonzero` or boolean-mask index of a device tensor waits for the GPU;
the engine allows one device-to-host copy per step (the sampled tokens and their log-probs, in `generate`, after the
step). On this CPU nothing waits, so the test traces instead: a TorchFunctionMode is active inside
`ModelRunner.run` and the sampler's `_sample` of every decode step (the window between the step's start and that
copy) and records each such call on a *step tensor*: the model's parameters, the KV pages, the RoPE tables, the
step's Context and the BatchRows fields that live on the sampling device, anything moved with `.to(device)`, and
every tensor a torch function computes from one of them (taint tracking; the host-side tables of the scheduler,
e.g. the step counters `_sample` hashes into uniforms, stay host tensors and may be read). The GPU side is
tests/gpu/test_gpu_host_syncs.py (torch.cuda.set_sync_debug_mode("error")).

test_an_inserted_item_is_caught and test_a_host_read_inside_the_forward_is_caught show the check can fail: they
insert `logits.max().item()` and a boolean-mask index into the sampling call, and a `.tolist()` of the hidden states
into the forward, and expect each to be reported.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import dash.engine.generation as sampler_mod
import dash.model as model_mod
from dash.engine import SamplingParams, generate
from dash.engine.runner import ModelRunner

# Calls that read a device tensor on the host (each is a device sync on CUDA).
HOST_READS = {torch.Tensor.item: "item", torch.Tensor.cpu: "cpu", torch.Tensor.tolist: "tolist",
              torch.Tensor.numpy: "numpy", torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero",
              torch.Tensor.__bool__: "bool", torch.Tensor.__int__: "int", torch.Tensor.__float__: "float",
              torch.Tensor.__index__: "index", torch.masked_select: "masked_select",
              torch.Tensor.masked_select: "masked_select", torch.argwhere: "argwhere"}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}
# The presets' settings (top-k 50 on a vocabulary of 97: the filter acts) with a min-tokens stop mask.
PARAMS = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, min_new_tokens=3, max_new_tokens=8, seed=3,
                        stop_token_ids=[2, 5])


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class HostReadTracer(TorchFunctionMode):
    """Records host reads of tainted (step) tensors; taints every output computed from a tainted input."""

    def __init__(self):
        super().__init__()
        self.tainted: dict[int, torch.Tensor] = {}  # id -> tensor (held, so ids stay unique within a step)
        self.reads: list[str] = []

    def taint(self, *objs):
        for obj in objs:
            for t in _tensors(obj):
                self.tainted[id(t)] = t

    def is_tainted(self, obj) -> bool:
        return any(id(t) in self.tainted for t in _tensors(obj))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hit = self.is_tainted(args) or self.is_tainted(kwargs)
        if hit and func in HOST_READS:
            self.reads.append(HOST_READS[func])
        if func in INDEXING and len(args) > 1:
            masks = [t for t in _tensors(args[1]) if t.dtype == torch.bool]
            if masks and (hit or self.is_tainted(masks)):
                self.reads.append("boolean-mask index")
        out = func(*args, **kwargs)
        moved = func is torch.Tensor.to and any(isinstance(a, (torch.device, str))
                                                for a in (*args[1:], *kwargs.values()))
        if hit or moved:
            self.taint(out)
        return out


@pytest.fixture
def traced_decode_steps(monkeypatch):
    """Runs the tracer inside every decode step's ModelRunner.run and _sample; yields (tracer, decode step count)."""
    tracer, steps = HostReadTracer(), []
    run, sample = ModelRunner.run, sampler_mod._sample

    def traced_run(self, ctx):
        if ctx.is_prefill:
            return run(self, ctx)
        steps.append(1)
        tracer.tainted.clear()
        tracer.taint(list(self.model.parameters()), self.cache.k, self.cache.v, self.cos, self.sin,
                     [getattr(ctx, f) for f in ctx.__slots__])
        with tracer:
            logits = run(self, ctx)
        tracer.taint(logits)
        return logits

    def traced_sample(table, batch, logits):
        if not tracer.is_tainted(logits):  # a prefill step's logits: not traced
            return sample(table, batch, logits)
        tracer.taint(batch.temperature, batch.top_k, batch.top_p, batch.device_stop_ids, batch.greedy)
        with tracer:
            return sample(table, batch, logits)

    monkeypatch.setattr(ModelRunner, "run", traced_run)
    monkeypatch.setattr(sampler_mod, "_sample", traced_sample)
    return tracer, steps


@pytest.mark.parametrize("params", [PARAMS, SamplingParams(temperature=0.7, max_new_tokens=8, seed=1)],
                         ids=["presets-filters", "temperature-only"])
def test_decode_steps_read_no_step_tensor_on_the_host(params, traced_decode_steps, model_pair, make_prompts):
    tracer, steps = traced_decode_steps
    _, model = model_pair("qwen2")
    generate(model, None, make_prompts([5, 9, 3]), n=2, params=params, page_size=4)
    assert len(steps) >= params.max_new_tokens - 1  # every token after the first comes from a traced decode step
    assert tracer.reads == []


def test_an_inserted_item_is_caught(traced_decode_steps, model_pair, make_prompts, monkeypatch):
    """The check can fail: a `.item()` and a boolean-mask index added to the sampling call are both reported."""
    tracer, steps = traced_decode_steps
    fused = sampler_mod.sample_rows

    def with_host_reads(logits, *args, **kwargs):
        if logits.max().item() > 1e30:  # a host read of the step's logits
            raise AssertionError("unreachable")
        _ = logits[logits > 0]  # a boolean-mask index
        return fused(logits, *args, **kwargs)

    monkeypatch.setattr(sampler_mod, "sample_rows", with_host_reads)
    _, model = model_pair("qwen2")
    generate(model, None, make_prompts([5, 9]), params=PARAMS, page_size=4)
    assert steps and {"item", "boolean-mask index"} <= set(tracer.reads)


def test_a_host_read_inside_the_forward_is_caught(traced_decode_steps, model_pair, make_prompts, monkeypatch):
    """Taint reaches the forward's activations: a `.tolist()` of the final norm's input in CausalLM.paged_forward."""
    tracer, steps = traced_decode_steps
    norm = model_mod.rms_norm

    def with_tolist(x, *args, **kwargs):
        x[:1, :1].tolist()
        return norm(x, *args, **kwargs)

    monkeypatch.setattr(model_mod, "rms_norm", with_tolist)
    _, model = model_pair("qwen2")
    generate(model, None, make_prompts([5, 9]), params=PARAMS, page_size=4)
    assert steps and tracer.reads.count("tolist") == len(steps)
