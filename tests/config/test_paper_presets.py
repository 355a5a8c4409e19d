"""Dry run of the paper presets (configs/qwen2.5-*-math.yaml) without a GPU, the weights or the data.

Each preset is loaded in full with `model.path` pointed at a folder holding only Qwen2.5's real config.json, the
model is built on the `meta` device (shapes, no memory), and the test checks what a GPU run would rely on: the
parameter count, the micro-batch arithmetic of the real step code (dash/rl/step.py with a stub sampler and model),
the sequence length against the model's positions, and the memory plan that docs/paper-setting.md quotes.

Run: `DASH_TEST_THREADS=1 python -m pytest tests/config/test_paper_presets.py -q`.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dash.config import ConfigError, load_config
from dash.engine.kv_cache import KVCache
from dash.model import CausalLM
from dash.model_io import read_config
from dash.rl.rollout import Rollout
from dash.rl.step import run_step
from dash.runtime import resolve_dtype, resolve_model_path
from dash_kernels.ops.token_logprobs_bwd import backward_plan

CONFIGS = Path(__file__).parents[2] / "configs"

# Qwen2.5's published config.json values (huggingface.co/Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B, base models).
QWEN25_VOCAB = 151936
QWEN25_ROPE_THETA = 1_000_000.0
QWEN25_MAX_POSITIONS = 32768
QWEN25_RMS_EPS = 1e-6
QWEN25_EOS = 151643  # <|endoftext|>: bos and eos of the base models
QWEN25_0_5B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
               "intermediate_size": 4864}
QWEN25_1_5B = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
               "intermediate_size": 8960}

# Parameter counts with tied embeddings (the lm_head is the embedding matrix), from the formula in
# `qwen2_param_count`; Qwen's model cards round them to 0.49B and 1.54B (non-embedding 0.36B and 1.31B).
QWEN25_0_5B_PARAMS = 494_032_768
QWEN25_1_5B_PARAMS = 1_543_714_304

PRESETS = {  # preset file -> (architecture, parameter count)
    "qwen2.5-0.5b-math.yaml": (QWEN25_0_5B, QWEN25_0_5B_PARAMS),
    "qwen2.5-1.5b-math.yaml": (QWEN25_1_5B, QWEN25_1_5B_PARAMS),
}

# The paper's settings (Huang et al., arXiv 2505.17218, section 2.6).
PAPER_PROMPTS_PER_STEP, PAPER_G, PAPER_MICRO_BATCH = 64, 4, 8
PAPER_SAMPLES_PER_STEP = 256  # M = 64 prompts x G
PAPER_ACCUM_STEPS = 32  # K_acc = M / micro-batch
PAPER_MAX_PROMPT, PAPER_MAX_COMPLETION = 256, 2048

# The memory plan docs/paper-setting.md quotes, in GiB (2**30 bytes), per preset: bf16 policy + KL reference copy,
# plus fp32 master weights, their fp32 gradients and 2 fp32 AdamW moments (dash/rl/optim.py: each backward's bf16
# gradient is moved onto the master's fp32 .grad and freed); the worst-case KV pool of one DASH sampling call (256
# sequences) and of one GRPO call (8 sequences); the fused loss's Triton backward buffers (`backward_plan`).
# The last column, derived from backward_plan's docstring for a micro-batch's n = 8 x 2048 = 16384 completion rows,
# V = 151936, bf16 (e = 2), on an H100 (528 programs), deterministic mode (the larger of the two modes):
#   Vc = DZ_CHUNK_BYTES / (n e) = 2**27 / 32768 = 4096 columns; dz chunk n Vc e = 16384 x 4096 x 2 = 128 MiB.
#   38 chunks (> 1), so the fp32 dH running sum n H 4 is kept.
#   0.5B, H = 896:  dH 16384 x 896 x 4 = 56 MiB; dW tiles per chunk (4096 / 128) x (896 / 64) = 448 < 528 programs,
#                   so S = ceil(528 / 448) = 2 fp32 partial planes, 2 x 4096 x 896 x 4 = 28 MiB.
#                   128 + 56 + 28 = 212 MiB = 0.207 GiB -> 0.21.
#   1.5B, H = 1536: dH 16384 x 1536 x 4 = 96 MiB; (4096 / 128) x (1536 / 64) = 768 tiles fill 528 programs: S = 1,
#                   no partials (each dW tile is written once, in bf16). 128 + 96 = 224 MiB = 0.219 GiB -> 0.22.
# dW itself comes back in bf16 like every parameter gradient, which MasterWeightAdamW moves onto the fp32 master
# .grad (counted in the first column).
EXPECTED_GIB = {
    "qwen2.5-0.5b-math.yaml": (9.20, 6.75, 0.21, 0.21),
    "qwen2.5-1.5b-math.yaml": (28.75, 15.75, 0.49, 0.22),
}
_H100_PROGRAMS = 4 * 132  # num_programs_target on an H100: 4 programs per SM, 132 SMs
_MASTER_FP32_COPIES = 4  # MasterWeightAdamW: master weights, their gradients, exp_avg, exp_avg_sq, all fp32
_FP32_BYTES = 4


def qwen2_param_count(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
                      vocab=QWEN25_VOCAB, tied=True) -> int:
    """Parameters of a Qwen2 / Qwen2.5 decoder, with H = hidden, D = H / heads, KV = kv_heads * D, I = intermediate:

        per layer = q (H*H + H) + k and v (2 * (H*KV + KV)) + o (H*H, no bias) + MLP (3*H*I) + 2 RMSNorms (2*H)
        total     = layers * per layer + embedding (V*H) + final RMSNorm (H) [+ lm_head V*H when untied]

    0.5B: 24 * 14,912,384 + 136,134,656 + 896 = 494,032,768.
    1.5B: 28 * 46,797,824 + 233,373,696 + 1,536 = 1,543,714,304.
    """
    h, i = hidden_size, intermediate_size
    kv = num_key_value_heads * (h // num_attention_heads)
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return num_hidden_layers * per_layer + vocab * h + h + (0 if tied else vocab * h)


def write_qwen25_folder(folder: Path, arch: dict) -> Path:
    """A model folder with only config.json, as the Qwen2.5 repository ships it (the fields dash reads)."""
    folder.mkdir(parents=True)
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": QWEN25_VOCAB,
              "hidden_act": "silu", "rms_norm_eps": QWEN25_RMS_EPS, "rope_theta": QWEN25_ROPE_THETA,
              "max_position_embeddings": QWEN25_MAX_POSITIONS, "tie_word_embeddings": True,
              "use_sliding_window": False, "bos_token_id": QWEN25_EOS, "eos_token_id": QWEN25_EOS,
              "torch_dtype": "bfloat16", **arch}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_preset(name: str, tmp_path: Path, *overrides: str):
    """-> (config, meta-device model) of a preset, with model.path pointed at a config-only Qwen2.5 folder."""
    arch, _ = PRESETS[name]
    folder = write_qwen25_folder(tmp_path / name.removesuffix(".yaml"), arch)
    cfg = load_config(CONFIGS / name, [f"--model.path={folder}", *overrides])
    model_cfg = read_config(resolve_model_path(cfg.model.path))
    with torch.device("meta"):  # what load_model builds before reading any weight: shapes only, no memory
        model = CausalLM(model_cfg).to(resolve_dtype(cfg.model.dtype))
    return cfg, model


def test_every_paper_preset_is_tested():
    assert {p.name for p in CONFIGS.glob("qwen2.5-*-math.yaml")} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_carries_the_paper_settings(name):
    cfg = load_config(CONFIGS / name)
    t, loss, s, d = cfg.train, cfg.loss, cfg.sampling, cfg.data
    assert (t.prompts_per_step, t.group_size, t.micro_batch_size) == (PAPER_PROMPTS_PER_STEP, PAPER_G,
                                                                     PAPER_MICRO_BATCH)
    assert (t.lr, t.weight_decay, t.lr_schedule, t.grad_clip, t.ppo_epochs) == (3e-6, 0.0, "linear", 1.0, 1)
    assert (loss.loss_type, loss.normalizer, loss.beta, loss.adv_threshold) == ("dr_grpo", "paper", 0.04, 0.1)
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (0.9, 50, 1.0, PAPER_MAX_COMPLETION)
    assert (d.max_prompt_tokens, d.prompt_template, d.chat_template, d.reward) == (PAPER_MAX_PROMPT, "{prompt}",
                                                                                  "never", "math")
    assert (cfg.model.dtype, cfg.model.device) == ("bfloat16", "cuda")
    assert t.seed == d.seed == 42
    assert t.steps == math.ceil(3 * 12000 / PAPER_PROMPTS_PER_STEP)  # 3 epochs of the 12,000-problem train split


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_meta_model_has_qwen25_parameter_count(name, tmp_path):
    arch, expected = PRESETS[name]
    assert qwen2_param_count(**arch) == expected
    _, model = load_preset(name, tmp_path)
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() for p in params) == expected
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()  # tied, as HF saves it


class _StubSampler:
    """Stands in for the engine: records each call's size; group g gets rewards [1, 0, 0, 0] (informative, kept)
    when g is even and [0, 0, 0, 0] (uniform, filtered by DASH) when g is odd and `filter_half` is set."""

    def __init__(self, filter_half: bool):
        self.filter_half, self.calls = filter_half, []
        self.reward_seconds, self.reward_stats = 0.0, SimpleNamespace(failures=0, no_reward=0)

    def sample(self, examples, group_size, run_seed, step, first_index):
        self.calls.append(len(examples) * group_size)
        rewards = []
        for k in range(first_index, first_index + len(examples)):
            uniform = self.filter_half and k % 2
            rewards += [0.0] * group_size if uniform else [1.0] + [0.0] * (group_size - 1)
        n = len(rewards)
        return Rollout([[1, 2, 3]] * n, [[4, 5]] * n, [torch.zeros(2)] * n, torch.tensor(rewards), group_size)


class _StubUpdate:
    """Stands in for PolicyUpdate: records the micro-batches and normalisers the step hands it."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.micro_batches: list[tuple[list[int], float]] = []

    def backward(self, mb, normalizer, old_logp):
        self.micro_batches.append((mb.indices, normalizer))
        return {}

    def step(self, info=None):
        return {}


@pytest.mark.parametrize("filter_half", [False, True], ids=["all-informative", "half-filtered"])
@pytest.mark.parametrize("algorithm", ["grpo", "dash"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_micro_batch_arithmetic_of_one_step(name, algorithm, filter_half, tmp_path):
    cfg, _ = load_preset(name, tmp_path, f"--train.algorithm={algorithm}")
    t = cfg.train
    assert t.prompts_per_step * t.group_size == PAPER_SAMPLES_PER_STEP
    assert PAPER_SAMPLES_PER_STEP // t.micro_batch_size == PAPER_ACCUM_STEPS
    sampler, update = _StubSampler(filter_half), _StubUpdate()
    metrics, rollout = run_step(cfg, sampler, update, [None] * t.prompts_per_step, step=0)

    assert len(rollout) == PAPER_SAMPLES_PER_STEP
    if algorithm == "grpo":  # one call per backprop micro-batch: 8 completions = 2 prompts x G
        assert sampler.calls == [PAPER_MICRO_BATCH] * PAPER_ACCUM_STEPS
    else:  # preemptive sampling: the whole step in one call
        assert sampler.calls == [PAPER_SAMPLES_PER_STEP]
    assert metrics["rollout/sampling_calls"] == len(sampler.calls)

    # 32 consecutive micro-batches of 8 = 2 whole groups; DASH drops the filtered group's rows from its micro-batch.
    assert len(update.micro_batches) == PAPER_ACCUM_STEPS
    for k, (indices, normalizer) in enumerate(update.micro_batches):
        rows = list(range(k * PAPER_MICRO_BATCH, (k + 1) * PAPER_MICRO_BATCH))
        if algorithm == "dash" and filter_half:
            rows = rows[:PAPER_G]  # prompts 2k (kept) and 2k+1 (uniform rewards, filtered)
        assert indices == rows
        # dr_grpo, paper normaliser: kept rows x max completion length x accumulation steps (dash/rl/loss_norm.py)
        assert normalizer == len(rows) * PAPER_MAX_COMPLETION * PAPER_ACCUM_STEPS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_longest_sequence_fits_positions_and_token_budget(name, tmp_path):
    cfg, model = load_preset(name, tmp_path)
    longest = cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens
    assert longest == PAPER_MAX_PROMPT + PAPER_MAX_COMPLETION
    assert longest <= model.config.max_position_embeddings
    # The paper normaliser trains on the paper's fixed micro-batches (packing.plan_fixed) and ignores the token
    # budget, so the preset leaves it unset; a budget set for the global normaliser must hold one whole sample
    # (its packed length is prompt + completion - 1), or every long sample would get a micro-batch of its own.
    budget = cfg.train.token_budget
    assert budget == 0 if cfg.loss.normalizer == "paper" else budget == 0 or budget >= longest - 1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_memory_plan_quoted_in_docs(name, tmp_path):
    cfg, model = load_preset(name, tmp_path)
    gib = 2**30
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    numel = sum(p.numel() for p in model.parameters())
    model_copies = 1 + (1 if cfg.loss.beta > 0 else 0)  # policy, KL reference (model dtype); no bf16 gradients kept
    state_bytes = model_copies * param_bytes + _MASTER_FP32_COPIES * numel * _FP32_BYTES
    # The engine sizes its KV pool (sampling.num_pages 0) so every sequence of a call fits at its longest:
    # G x prompts x ceil((prompt + max_new_tokens) / page_size) pages (dash/engine/generation.py).
    pages_per_seq = math.ceil((cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens) / cfg.sampling.page_size)
    page_bytes = KVCache.bytes_per_page(model, cfg.sampling.page_size)
    dash_kv = cfg.train.prompts_per_step * cfg.train.group_size * pages_per_seq * page_bytes
    grpo_kv = cfg.train.micro_batch_size * pages_per_seq * page_bytes  # one call = one micro-batch of completions
    # The Triton backward of the fused loss needs at most backward_plan's extra bytes (a dz chunk, the fp32 dH
    # running sum, dW split-K partials) on a micro-batch's completion rows; the [N, V] logits never exist
    # (8 x 2048 x V fp32 would be 9.3 GiB) and dW is written in the weight's dtype (no fp32 [V, H] buffer).
    loss_rows = cfg.train.micro_batch_size * cfg.sampling.max_new_tokens  # [n] rows with a loss gradient, at most
    V, H = model.lm_head_weight.shape
    loss_bwd = backward_plan(loss_rows, V, H, model.lm_head_weight.dtype, _H100_PROGRAMS, deterministic=True)
    plan = (state_bytes, dash_kv, grpo_kv, loss_bwd.extra_bytes)
    assert tuple(round(b / gib, 2) for b in plan) == EXPECTED_GIB[name]


@pytest.mark.parametrize("micro_batch_size", [6, 10])
def test_preset_with_micro_batch_splitting_a_group_names_the_field(micro_batch_size, tmp_path):
    """A GRPO sampling call and a paper micro-batch must hold whole groups of G = 4 completions."""
    data = yaml.safe_load((CONFIGS / "qwen2.5-0.5b-math.yaml").read_text())
    data["train"]["micro_batch_size"] = micro_batch_size
    bad = tmp_path / "bad-preset.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size \(\d+\) must be a multiple of train\.group_size"):
        load_config(bad)
