"""TRL GRPOTrainer adapter on CPU: the loss and every parameter gradient equal TRL's own `_compute_loss` on a tiny
random Qwen2, for each supported loss type, with and without KL, and for a peft LoRA model; and the fused path's peak
memory is lower."""

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dash_kernels import backend
from dash_kernels.integrations.trl import dash_compute_loss, unsupported_reason, use_dash_loss

VOCAB = 1000
PROMPT, COMPLETION, BATCH = 5, 12, 8


@pytest.fixture(scope="module")
def model_dir():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    d = tempfile.mkdtemp()
    Qwen2ForCausalLM(cfg).save_pretrained(d)  # a folder, so TRL can load the reference model from it
    return d


def _tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB - 2)}
    vocab.update({"<pad>": VOCAB - 2, "<eos>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _trainer(model_dir, peft_config=None, **cfg):
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, per_device_train_batch_size=BATCH,
                          num_generations=4, max_completion_length=COMPLETION, report_to="none", bf16=False,
                          temperature=0.9, **cfg)
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["t1 t2 t3"] * BATCH}),
                              processing_class=_tokenizer(), peft_config=peft_config)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by the training loop
    trainer.model.train()
    return trainer


def _inputs(with_old, with_ref):
    g = torch.Generator().manual_seed(1)
    completion_mask = torch.ones(BATCH, COMPLETION, dtype=torch.long)
    completion_mask[1, 7:] = 0  # ragged completions
    completion_mask[5, 2:] = 0
    inputs = {
        "prompt_ids": torch.randint(0, VOCAB - 2, (BATCH, PROMPT), generator=g),
        "prompt_mask": torch.ones(BATCH, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(0, VOCAB - 2, (BATCH, COMPLETION), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.0, 0.0, 2.0, -1.0, 0.3, 0.0]),
        "num_items_in_batch": completion_mask.sum().float() * 2,
    }
    # Sampling-time / reference log-probs near the model's own (about -ln V), so ratios straddle the clip range.
    if with_old:
        inputs["old_per_token_logps"] = -6.9 + 0.3 * torch.randn(BATCH, COMPLETION, generator=g)
    if with_ref:
        inputs["ref_per_token_logps"] = -6.9 + 0.3 * torch.randn(BATCH, COMPLETION, generator=g)
    return inputs


def _loss_and_grads(trainer, fn, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,with_old", [(0.0, False), (0.04, True)])
def test_adapter_matches_trl(model_dir, loss_type, beta, with_old):
    trainer = _trainer(model_dir, loss_type=loss_type, beta=beta)
    assert unsupported_reason(trainer) is None
    inputs = _inputs(with_old, beta != 0.0)
    trl_loss, trl_grads = _loss_and_grads(trainer, trainer._compute_loss, inputs)
    with backend.use_backend("torch"):
        ours_loss, ours_grads = _loss_and_grads(trainer, lambda m, x: dash_compute_loss(trainer, m, x), inputs)
    assert torch.allclose(ours_loss, trl_loss, rtol=1e-5, atol=1e-7), (ours_loss, trl_loss)
    assert trl_grads.keys() == ours_grads.keys()
    for name, g in trl_grads.items():
        scale = g.abs().max().item() + 1e-12
        err = (ours_grads[name] - g).abs().max().item()
        assert err <= 1e-4 * scale + 1e-9, f"{name}: max err {err:.3e} (max |grad| {scale:.3e})"
    assert trainer._metrics["train"]["entropy"], "the adapter logs TRL's metrics"


def test_use_dash_loss_patches_and_falls_back(model_dir):
    trainer = use_dash_loss(_trainer(model_dir, loss_type="dapo"))
    inputs = _inputs(False, False)
    ours, _ = _loss_and_grads(trainer, trainer._compute_loss, inputs)
    trl_loss, _ = _loss_and_grads(trainer, trainer._trl_compute_loss, inputs)
    assert torch.allclose(ours, trl_loss, rtol=1e-5)
    cispo = use_dash_loss(_trainer(model_dir, loss_type="cispo"))
    assert unsupported_reason(cispo) == "loss_type='cispo'"
    with pytest.warns(UserWarning, match="falling back to TRL's loss"):
        cispo._compute_loss(cispo.model, inputs)


def test_wrapped_model_falls_back_to_trl(model_dir):
    """Under DDP / DeepSpeed the model TRL passes is a wrapper: the fused path must not run the backbone outside it
    (the wrapper's gradient sync would be skipped), so the adapter falls back to TRL's loss, with a warning."""
    trainer = use_dash_loss(_trainer(model_dir, loss_type="grpo"))
    inputs = _inputs(False, False)

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: no get_output_embeddings / base_model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    wrapped = Wrapper(trainer.model)
    trainer.accelerator.unwrap_model = lambda m: m.module if isinstance(m, Wrapper) else m
    fallback = []
    trainer._trl_compute_loss = lambda model, batch: fallback.append(model) or torch.zeros(())
    with pytest.warns(UserWarning, match=r"falling back to TRL's loss \(a wrapped model \(Wrapper\)"):
        trainer._compute_loss(wrapped, inputs)
    assert fallback == [wrapped]


def test_adapter_with_a_peft_model(model_dir):
    """A GRPOTrainer given a peft LoraConfig: the fused path runs the backbone with the adapters in it (it would take
    `model.base_model`, peft's LoraModel, which returns logits, not hidden states); the loss and every LoRA gradient
    equal TRL's own."""
    peft = pytest.importorskip("peft", reason="peft is in the dev extra: pip install -e .[dev]")
    trainer = _trainer(model_dir, loss_type="dr_grpo", peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, peft.PeftModel) and unsupported_reason(trainer) is None
    torch.manual_seed(2)
    with torch.no_grad():  # non-zero B: with peft's B = 0 the adapters would not change the loss
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    inputs = _inputs(True, False)
    trl_loss, trl_grads = _loss_and_grads(trainer, trainer._compute_loss, inputs)
    with backend.use_backend("torch"):
        ours_loss, ours_grads = _loss_and_grads(trainer, lambda m, x: dash_compute_loss(trainer, m, x), inputs)
    assert torch.allclose(ours_loss, trl_loss, rtol=1e-5, atol=1e-7), (ours_loss, trl_loss)
    assert trl_grads.keys() == ours_grads.keys() and len(ours_grads) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    assert all("lora_" in n for n in ours_grads)
    for name, g in trl_grads.items():
        err = (ours_grads[name] - g).abs().max().item()
        assert err <= 1e-4 * (g.abs().max().item() + 1e-12) + 1e-9, f"{name}: max err {err:.3e}"


@pytest.mark.slow
def test_adapter_peak_memory_is_lower(model_dir):
    """Loss + backward of one batch: peak RSS rise of TRL's path vs ours, with a vocabulary large enough that
    the logits dominate (the model itself is tiny)."""
    import os
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to read the peak RSS")
    global VOCAB, COMPLETION
    saved = VOCAB, COMPLETION
    VOCAB, COMPLETION = 32000, 240
    try:
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        d = tempfile.mkdtemp()
        Qwen2ForCausalLM(cfg).save_pretrained(d)
        trainer = _trainer(d, loss_type="dapo")
        inputs = _inputs(True, False)

        def peak_rise(fn):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status("VmRSS")
            _loss_and_grads(trainer, fn, inputs)
            return _status("VmHWM") - base

        with backend.use_backend("torch"):
            ours = min(peak_rise(lambda m, x: dash_compute_loss(trainer, m, x)) for _ in range(2))
        theirs = min(peak_rise(trainer._compute_loss) for _ in range(2))
    finally:
        VOCAB, COMPLETION = saved
    logits_mb = BATCH * 240 * 32000 * 4 / 2**20
    assert ours < theirs, f"peak rise: ours {ours / 2**20:.0f} MiB, TRL {theirs / 2**20:.0f} MiB"
    print(f"peak rise: ours {ours / 2**20:.0f} MiB, TRL {theirs / 2**20:.0f} MiB (fp32 logits: {logits_mb:.0f} MiB)")


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)
