"""Typed configuration: one dataclass per component, nested into `DashConfig`.

Sources, later ones win: the dataclass defaults, a YAML preset (`configs/*.yaml`), then `--section.key=value`
overrides from the command line. Every key is checked: an unknown section or key, or a value of the wrong type, is a
`ConfigError` naming the key, raised before any work starts. An override's text is read by its field's type: text
fields take it as given (`--data.prompt_template={prompt}`), others read it as a YAML scalar. A bad YAML file (syntax,
a key given twice, not UTF-8) is one line naming `file:line:column`. `DashConfig.check_for_training()` holds what only
training needs (no greedy sampling).

    cfg = load_config("configs/tiny.yaml", ["--train.lr=3e-5", "--sampling.temperature=0.9"])
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dash.data import template_problem
from dash.rewards import RewardSpecError, check_reward_spec

BUILTIN_TASKS = ("arith", "scratchpad")  # data.task values generated in code, not read from files
BUILTIN_TINY = "builtin:tiny-sft"  # the SFT warm start shipped in dash/assets/tiny-sft
MAX_REWARD_TIMEOUT_S = 1e6  # the reward guard's OS timer overflows far above this; no reward call needs days
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")  # what resolve_device accepts (torch's own error lists 20 types)


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message names it."""


# The projections of a decoder layer (dash.model's names, HF's too) that LoRA may adapt; "all-linear" means all of
# them, as in peft. The lm_head is not offered: the fused loss reads its weight directly (dash/lora.py).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    enabled: bool = False
    """Train low-rank adapters on the targeted projections instead of the whole model (dash/lora.py)."""
    rank: int = 16
    """r: the adapters' inner width (A is [r, in], B is [out, r])."""
    alpha: float = 32.0
    """Scaling numerator: the adapter's output is multiplied by alpha / rank (peft's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input only (peft's lora_dropout), in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Projections to adapt: a list or comma-separated names from LORA_MODULES, or `all-linear` (all of them)."""

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"model.lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        names = self.target_names()
        unknown = [n for n in names if n not in LORA_MODULES]
        if not names or unknown:
            what = f"{unknown[0]!r} matches no module" if unknown else "is empty"
            raise ConfigError(f"model.lora.target_modules: {what} (available: all-linear, {', '.join(LORA_MODULES)})")

    def target_names(self) -> list[str]:
        """The targeted projection names, in LORA_MODULES order when all-linear."""
        items = self.target_modules.split(",") if isinstance(self.target_modules, str) else self.target_modules
        if not all(isinstance(n, str) for n in items):
            raise ConfigError(f"model.lora.target_modules: expected names, got {self.target_modules!r}")
        names = [n.strip() for n in items if n.strip()]
        return list(LORA_MODULES) if names == ["all-linear"] else names


@dataclass(kw_only=True, slots=True)
class ModelLoadConfig:
    path: str = BUILTIN_TINY
    """Local HF folder (config.json + *.safetensors + tokenizer files), or `builtin:tiny-sft`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype for training and sampling (float16 is refused: the trainer does no loss scaling)."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:N`."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (off by default): only they and their optimizer state train; the base stays frozen."""

    def __post_init__(self):
        if not self.path.strip():  # Path("") is the working directory: the error would name the wrong folder
            raise ConfigError("model.path must not be empty (an HF model folder, or builtin:tiny-sft)")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"model.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    task: Literal["arith", "scratchpad", "jsonl", "parquet"] = "arith"
    """`arith`: the built-in synthetic arithmetic task; `scratchpad`: the built-in reasoning task (sums the model may
    work through with a scratchpad, dash/tasks/scratchpad.py); `jsonl`/`parquet`: local files given by `train_path`."""
    train_path: str | None = None
    """Training data for jsonl/parquet tasks: a file, a glob of shards (`data/train-*.parquet`), or a folder written
    by `datasets`' save_to_disk (dash/data_sources.py)."""
    test_path: str | None = None
    """Held-out data for jsonl/parquet tasks, in any form train_path takes."""
    split: str = "train"
    """The split of a saved DatasetDict folder that train_path reads (files, globs and a saved Dataset ignore it)."""
    test_split: str = "test"
    """The split of a saved DatasetDict folder that test_path reads."""
    prompt_field: str = "prompt"
    """Row field holding the prompt."""
    answer_field: str = "answer"
    """Row field holding the reference answer."""
    reward: str = "arith"
    """Verifiable reward name (dash.rewards): arith, gsm8k (`#### n`), math (`\\boxed{}`), code, format, or your own
    `path/to/file.py:function` / `package.module:function` (per-sample or TRL form: dash/rewards/user.py); `a+b`
    sums. With data.task=scratchpad the default `arith` means the task's own reward, `scratchpad`."""
    reward_timeout_s: float = 10.0
    """A reward call that takes longer scores 0 (counted, logged); the run goes on."""
    prompt_template: str = "{prompt}"
    """jsonl/parquet: `str.format` template over the row's fields; `{prompt}` is the prompt field."""
    chat_template: Literal["never", "auto", "always"] = "never"
    """jsonl/parquet: wrap prompts in the tokenizer's chat template (the paper: never)."""
    max_prompt_tokens: int = 0
    """jsonl/parquet: skip (and count) prompts longer than this; 0 = no limit. The paper's limit is 256."""
    strict: bool = False
    """jsonl/parquet: a bad row is an error naming it, instead of being skipped and counted."""
    arith_form: Literal["a+b", "a*b", "a+b*c", "a*b+c"] = "a+b*c"
    """Built-in task expression shape: the keys of dash.tasks.arith.FORMS (a test keeps the two lists equal)."""
    arith_digits: int = 2
    """Built-in task difficulty: digits per operand (zero-padded)."""
    test_size: int = 500
    """Held-out prompts used for evaluation."""
    seed: int = 0
    """Seed of the train/test split and of the prompt order."""

    def __post_init__(self):
        if self.task == "scratchpad" and self.reward == "arith":  # the default names the arith task's reward
            self.reward = "scratchpad"
        if self.task not in BUILTIN_TASKS and not self.train_path:
            raise ConfigError(f"data.train_path is required when data.task={self.task!r}")
        for name in ("split", "test_split"):
            if not getattr(self, name).strip():
                raise ConfigError(f"data.{name} must not be empty (a split name of a saved DatasetDict)")
        if not 1 <= self.arith_digits <= 4:
            raise ConfigError(f"data.arith_digits must be in [1, 4], got {self.arith_digits}")
        _positive("data.test_size", self.test_size)
        try:  # imports a user's reward file or module (their own code, by design): fails here, before any work
            check_reward_spec(self.reward)
        except RewardSpecError as exc:
            raise ConfigError(f"data.reward: {exc}") from None
        if not 0 < self.reward_timeout_s <= MAX_REWARD_TIMEOUT_S:
            raise ConfigError(f"data.reward_timeout_s must be in (0, {MAX_REWARD_TIMEOUT_S:g}] (the OS timer's "
                              f"range), got {self.reward_timeout_s}")
        if self.max_prompt_tokens < 0:
            raise ConfigError(f"data.max_prompt_tokens must be >= 0 (0 = no limit), got {self.max_prompt_tokens}")
        problem = template_problem(self.prompt_template)
        if problem:
            raise ConfigError(f"data.prompt_template {self.prompt_template!r} is invalid: {problem}")


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    max_new_tokens: int = 8
    """Completion length limit (the paper: 2048)."""
    min_new_tokens: int = 0
    """EOS is suppressed before this many tokens."""
    page_size: int = 16
    """Tokens per KV-cache page."""
    num_pages: int = 0
    """KV pages per layer; 0 sizes the pool from the step's batch. A fixed pool must hold a prompt and its completion:
    data rows longer than num_pages x page_size - max_new_tokens are skipped (counted) at load."""
    cuda_graphs: bool = True
    """On CUDA, replay decode steps from per-batch-size CUDA graphs (docs/sampling.md); no effect on CPU."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.min_new_tokens < 0 or self.num_pages < 0:
            raise ConfigError("sampling.top_k, sampling.min_new_tokens and sampling.num_pages must be >= 0")
        _positive("sampling.max_new_tokens", self.max_new_tokens)
        _positive("sampling.page_size", self.page_size)
        if self.min_new_tokens and self.min_new_tokens >= self.max_new_tokens:
            # EOS is suppressed for the first min_new_tokens tokens: at or above max_new_tokens no completion can end
            raise ConfigError(f"sampling.min_new_tokens={self.min_new_tokens} must be < sampling.max_new_tokens="
                              f"{self.max_new_tokens}: no completion could stop with EOS (rewards that need it score 0)")


@dataclass(kw_only=True, slots=True)
class SelectionConfig:
    rule: Literal["dash_filter", "pods", "greso", "dppo", "none"] = "dash_filter"
    """Which samples train (dash/rl/selection.py, docs/selection.md): `dash_filter` |A| > loss.adv_threshold (DASH);
    `pods` max-variance down-sampling of each group; `greso` skip prompts whose recent groups had zero reward
    variance before generating them, then dash_filter; `dppo` random pruning with 1/p re-weighting; `none` all."""
    pods_keep: int = 2
    """pods: samples kept per group (m of train.group_size), in [2, train.group_size]."""
    greso_base_skip: float = 0.5
    """greso: skip probability after one zero-variance group; after z in a row, 1 - (1 - this)^z."""
    greso_max_skip: float = 0.9
    """greso: cap on the skip probability, below 1 so a skipped prompt can come back once it is informative."""
    dppo_min_keep: float = 0.2
    """dppo: the keep probability of the smallest-|A| samples (kept ones then weigh 1 / this), in (0, 1]."""
    dppo_adv_scale: float = 1.0
    """dppo: |A| at and above which a sample is always kept; below it the keep probability is |A| / this."""

    def __post_init__(self):
        if self.pods_keep < 2:
            raise ConfigError(f"loss.selection.pods_keep must be >= 2 (a group of one has no variance), got "
                              f"{self.pods_keep}")
        if not 0 < self.greso_base_skip <= self.greso_max_skip < 1:
            raise ConfigError(f"loss.selection: need 0 < greso_base_skip <= greso_max_skip < 1, got "
                              f"{self.greso_base_skip:g} and {self.greso_max_skip:g}")
        if not 0 < self.dppo_min_keep <= 1:
            raise ConfigError(f"loss.selection.dppo_min_keep must be in (0, 1], got {self.dppo_min_keep:g}")
        if self.dppo_adv_scale <= 0:
            raise ConfigError(f"loss.selection.dppo_adv_scale must be > 0, got {self.dppo_adv_scale:g}")


@dataclass(kw_only=True, slots=True)
class LossConfig:
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dr_grpo"
    """Token-loss reduction, with TRL's meanings (the paper's code uses dr_grpo)."""
    eps_low: float = 0.2
    """PPO clip: ratio lower bound 1 - eps_low."""
    eps_high: float = 0.2
    """PPO clip: ratio upper bound 1 + eps_high."""
    beta: float = 0.0
    """k3 KL coefficient to the frozen initial model; 0 does not even load the reference."""
    adv_threshold: float = 0.1
    """Gradient filtering: samples with |advantage| <= this contribute nothing (DASH; 0 keeps A != 0)."""
    gradient_filtering: bool = True
    """DASH's filter on (default) or off: off trains on every sample, the paper's No-GF ablation (dash only)."""
    normalizer: Literal["paper", "global"] = "global"
    """`paper`: per micro-batch kept rows x max length; `global`: fixed once per optimizer step."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Which samples train: DASH's filter (default) or another rule (dash/rl/selection.py)."""

    def __post_init__(self):
        if self.eps_low < 0 or self.eps_high < 0 or self.beta < 0 or self.adv_threshold < 0:
            raise ConfigError("loss.eps_low, loss.eps_high, loss.beta and loss.adv_threshold must be >= 0")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    algorithm: Literal["dash", "grpo"] = "dash"
    """`dash`: one sampling call per optimizer step + filtering; `grpo`: sampling per micro-batch, no filtering."""
    steps: int = 100
    """Optimizer steps."""
    prompts_per_step: int = 64
    """Prompts per optimizer step (the paper: 64)."""
    group_size: int = 4
    """Completions per prompt, G (the paper: 4)."""
    micro_batch_size: int = 8
    """Completions per backprop micro-batch (the paper: 8); grpo also samples this many per call."""
    token_budget: int = 0
    """dash: pack kept samples into micro-batches of at most this many tokens; 0 uses micro_batch_size rows."""
    share_prompts: bool = True
    """Pack each prompt once per micro-batch for all its samples (both algorithms): the prompt's forward is shared,
    the loss and update are unchanged. false: one copy per sample, as the paper's code does."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input in the forward and recompute the layer in backward (the paper did): the
    activations of a micro-batch shrink to one [T, H] tensor per layer, for about one more forward of compute."""
    lr: float = 3e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables."""
    ppo_epochs: int = 1
    """Optimizer steps over each step's samples (the paper's PPO-Multi: 3)."""
    ppo_minibatches: int = 1
    """Split a step's samples into this many mini-batches, one optimizer step each (the paper's PPO-Mini: 32)."""
    old_logp: Literal["recompute", "sampler"] = "recompute"
    """Ratio denominator: `recompute` = the policy before the step's first update (free when ppo_epochs = 1 and
    ppo_minibatches = 1: on-policy, ratio 1, as in the paper's code); `sampler` = the sampler's processed log-probs."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: a constant lr, or a `linear` / `cosine` decay to min_lr_ratio x lr at the last optimizer
    step (`linear` with no warm-up and min_lr_ratio 0 is the HF Trainer default, used by the paper)."""
    warmup_steps: int = 0
    """Optimizer steps of linear lr warm-up, from lr / warmup_steps up to lr. Counted like the schedule: per optimizer
    step, of which a run has steps x ppo_epochs x ppo_minibatches."""
    min_lr_ratio: float = 0.0
    """`linear` / `cosine`: the final lr as a fraction of train.lr (0: decay to 0)."""
    seed: int = 0
    """Seed for sampling, init and data order."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: `ddp` = a full replica per rank, one gradient all-reduce per optimizer step; `fsdp` = FSDP2,
    parameters / gradients / optimizer state sharded, full parameters gathered once per generation phase, sharded
    checkpoints. One process: the same single model either way (fsdp keeps its sharded checkpoint format)."""

    def __post_init__(self):
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        for name in ("steps", "prompts_per_step", "group_size", "micro_batch_size", "ppo_epochs", "ppo_minibatches"):
            _positive(f"train.{name}", getattr(self, name))
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.token_budget < 0:
            raise ConfigError("train.lr must be > 0; train.weight_decay, grad_clip, token_budget must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.group_size < 2:
            raise ConfigError(f"train.group_size must be >= 2, got {self.group_size}: advantages are relative to the "
                              "group, so with one sample per prompt every advantage is 0 and no step learns anything")
        if self.micro_batch_size % self.group_size:
            raise ConfigError(f"train.micro_batch_size ({self.micro_batch_size}) must be a multiple of "
                              f"train.group_size ({self.group_size}) so micro-batches hold whole groups")
        samples = self.prompts_per_step * self.group_size
        if self.ppo_minibatches > samples:
            raise ConfigError(f"train.ppo_minibatches={self.ppo_minibatches} must be <= the step's samples "
                              f"(train.prompts_per_step x train.group_size = {samples}): a mini-batch needs one")


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    steps: int = 2000
    """Optimizer steps of supervised fine-tuning (2000 reproduces the shipped dash/assets/tiny-sft)."""
    batch_size: int = 128
    """Examples per step."""
    lr: float = 1e-3
    """AdamW learning rate (the tiny model's; a pretrained 0.5B model wants ~1e-5)."""
    train_path: str | None = None
    """Prompt + solution rows (jsonl / parquet, read by dash.data with data.prompt_template / chat_template);
    None: data.train_path. With neither (data.task arith or scratchpad): the built-in task's warm start
    (docs/sft.md)."""
    prompt_field: str | None = None
    """Row field holding the prompt; None: data.prompt_field."""
    solution_field: str = "solution"
    """Row field holding the solution the loss trains on (every row must have it)."""
    append_eos: bool = True
    """End each solution with the tokenizer's EOS (unless it already does), so the model learns to stop."""
    token_budget: int = 0
    """Pack a step's examples into micro-batches of at most this many tokens (the same update, less memory; a longer
    example gets one to itself); 0: the whole step in one packed micro-batch."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: a constant lr, or linear / cosine decay to min_lr_ratio x lr at the last step (RL's
    schedule function, dash/rl/optim.py)."""
    warmup_steps: int = 0
    """Steps of linear lr warm-up from lr / warmup_steps."""
    min_lr_ratio: float = 0.1
    """Cosine schedule: the final lr as a fraction of sft.lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables."""

    def __post_init__(self):
        _positive("sft.steps", self.steps)
        _positive("sft.batch_size", self.batch_size)
        if self.lr <= 0:
            raise ConfigError(f"sft.lr must be > 0, got {self.lr}")
        for name in ("token_budget", "warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"sft.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"sft.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("train_path", "prompt_field", "solution_field"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ConfigError(f"sft.{name} must not be empty (leave it unset for the default)")


HELDOUT_SET = "heldout"  # the eval set an empty eval.sets stands for: the data section's held-out prompts


@dataclass(kw_only=True, slots=True)
class EvalSetConfig:
    path: str | None = None
    """A local jsonl / parquet file, a glob of shards or a save_to_disk folder (read by dash.data); null: the data
    section's held-out prompts (the built-in task's test split, data.test_path, or rows held out of data.train_path)."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """`auto` picks by suffix (.parquet / .pq -> parquet, else jsonl)."""
    split: str = "test"
    """The split read from a save_to_disk DatasetDict folder (ignored for files and globs)."""
    reward: str | None = None
    """Reward spec scoring this set (a name, `file.py:function`, `a+b`); null: data.reward."""
    prompt_field: str | None = None
    """Row field holding the prompt; null: data.prompt_field."""
    answer_field: str | None = None
    """Row field holding the reference answer; null: data.answer_field."""
    prompt_template: str | None = None
    """`str.format` template over the row's fields; null: data.prompt_template."""
    chat_template: Literal["never", "auto", "always"] | None = None
    """Wrap prompts in the tokenizer's chat template; null: data.chat_template."""
    limit: int = 0
    """Evaluate the first `limit` usable rows only; 0 = all (the held-out set: data.test_size rules)."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    temperature: float = 0.7
    """Sampling temperature of evaluation (the paper on MATH-500: 0.7); 0 = greedy, which needs n = 1."""
    top_p: float = 0.95
    """Nucleus mass of evaluation sampling, in (0, 1] (the paper: 0.95)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    max_new_tokens: int | None = None
    """Answer length limit of evaluation; null: sampling.max_new_tokens."""
    n: int = 1
    """Samples per prompt: pass@1 is their mean accuracy, pass@k the unbiased estimate from them."""
    k: list[int] = field(default_factory=lambda: [1])
    """pass@k values reported (`[1, 4]`, or `1,4` on the command line); every k must be <= n."""
    greedy: bool = True
    """Also decode each prompt greedily once and report its accuracy as greedy_acc (skipped when temperature is 0:
    the sampled pass is then greedy itself)."""
    sets: dict[str, Any] = field(default_factory=dict)
    """Named test sets: {name: {path, reward, ...}} (EvalSetConfig keys); empty: the held-out set, named heldout."""
    select: str = ""
    """Comma-separated names of `sets` to run (e.g. `math500,gsm8k`); empty: all of them."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"eval.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"eval.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens is not None:
            _positive("eval.max_new_tokens", self.max_new_tokens)
        _positive("eval.n", self.n)
        self.k = _k_list(self.k)
        if max(self.k) > self.n:
            raise ConfigError(f"eval.k={self.k}: pass@{max(self.k)} needs at least {max(self.k)} samples per prompt, "
                              f"but eval.n={self.n}; raise eval.n or drop that k")
        if self.is_greedy() and self.n > 1:
            raise ConfigError(f"eval.temperature={self.temperature:g}, eval.top_k={self.top_k} decodes greedily: the "
                              f"eval.n={self.n} samples of a prompt would be identical; use eval.n=1 (or a temperature "
                              "> 0 with eval.greedy=true to report greedy accuracy beside the sampled pass@k)")
        if not isinstance(self.sets, dict):
            raise ConfigError(f"eval.sets must be a mapping {{name: {{path: ..., reward: ...}}}}, got {self.sets!r}")
        sets = {}
        for name, spec in self.sets.items():
            if not isinstance(name, str) or not re.fullmatch(r"[\w.@+-]+", name):
                raise ConfigError(f"eval.sets: set name {name!r} must be letters, digits, _ . @ + - (it names metrics)")
            if isinstance(spec, _CommandLineText):  # --eval.sets.NAME={path: a.jsonl}: a YAML mapping as text
                spec = _read_command_line(f"eval.sets.{name}", spec, dict)
            if spec is None:  # `heldout:` with no keys
                spec = {}
            if not isinstance(spec, (dict, EvalSetConfig)):
                raise ConfigError(f"eval.sets.{name} must be a mapping of keys (path, reward, ...), got {spec!r}")
            sets[name] = spec if isinstance(spec, EvalSetConfig) else _build(EvalSetConfig, spec, f"eval.sets.{name}.")
            _check_eval_set(name, sets[name])
        self.sets = sets
        known = list(sets) or [HELDOUT_SET]
        unknown = [s for s in self.selected_names(known) if s not in known]
        if unknown:
            raise ConfigError(f"eval.select: no eval set named {unknown[0]!r} (known: {', '.join(known)})")

    def is_greedy(self) -> bool:
        """Whether the sampled pass is greedy decoding (temperature 0, or top-k 1)."""
        return self.temperature == 0 or self.top_k == 1

    def selected_names(self, known: list[str] | None = None) -> list[str]:
        """The set names to run, in eval.sets order (or eval.select's)."""
        known = known if known is not None else (list(self.sets) or [HELDOUT_SET])
        names = [s.strip() for s in self.select.split(",") if s.strip()]
        return names or known


def _k_list(value: Any) -> list[int]:
    """eval.k as a sorted list of distinct ints >= 1, from a list, an int or a `1,4,8` text."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    ks = [int(x) if isinstance(x, str) and x.strip().isdigit() else x for x in items]
    if not ks or len(set(ks)) != len(ks) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                     for x in ks):
        raise ConfigError(f"eval.k must be distinct integers >= 1 (e.g. [1, 4], or 1,4 on the command line), got "
                          f"{value!r}")
    return sorted(ks)


def _check_eval_set(name: str, spec: EvalSetConfig) -> None:
    key = f"eval.sets.{name}"
    if spec.path is not None and not spec.path.strip():
        raise ConfigError(f"{key}.path must not be empty (null: the data section's held-out set)")
    if spec.limit < 0:
        raise ConfigError(f"{key}.limit must be >= 0 (0 = all rows), got {spec.limit}")
    if spec.reward is not None:
        try:  # a user's reward file is imported here, before any work, as data.reward's is
            check_reward_spec(spec.reward)
        except RewardSpecError as exc:
            raise ConfigError(f"{key}.reward: {exc}") from None
    if spec.prompt_template is not None:
        problem = template_problem(spec.prompt_template)
        if problem:
            raise ConfigError(f"{key}.prompt_template {spec.prompt_template!r} is invalid: {problem}")


@dataclass(kw_only=True, slots=True)
class LogConfig:
    out_dir: str = "runs/tiny"
    """Where metrics, samples and checkpoints go."""
    log_every: int = 1
    """Steps between metric lines."""
    eval_every: int = 20
    """Steps between evaluations; 0 evaluates only at the end."""
    ckpt_every: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    eval_pass_k: int = 0
    """Replaced by the eval section (eval.n, eval.k, with eval's own sampling settings); kept so that setting it is
    an error saying so, not an unknown key."""
    samples_shown: int = 4
    """Completions written to samples.jsonl per eval set at each eval."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    wandb: bool = False
    """Also log metrics to Weights & Biases (rank 0 only; needs `pip install wandb`; WANDB_MODE=offline keeps the run
    in <out_dir>/wandb for a later `wandb sync`)."""
    wandb_project: str = "dash"
    """The W&B project of the run (the run's name is log.out_dir's folder name)."""

    def __post_init__(self):
        if not self.out_dir.strip():
            raise ConfigError("log.out_dir must not be empty (the run folder for metrics and checkpoints)")
        if self.wandb and importlib.util.find_spec("wandb") is None:  # find_spec: no import (wandb's takes ~1 s)
            raise ConfigError("log.wandb=true needs the wandb package, which is not installed: pip install wandb")
        if not self.wandb_project.strip():
            raise ConfigError("log.wandb_project must not be empty")
        for name in ("log_every", "eval_every", "ckpt_every", "eval_pass_k", "samples_shown"):
            if getattr(self, name) < 0:  # 0 has a meaning for each (off / only at the end); below 0 has none
                raise ConfigError(f"log.{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_pass_k:
            raise ConfigError(f"log.eval_pass_k was replaced by the eval section: use --eval.n={self.eval_pass_k} "
                              f"--eval.k=1,{self.eval_pass_k} (sampled with eval.temperature / eval.top_p, not "
                              "sampling.*; docs/evaluation.md)")


@dataclass(kw_only=True, slots=True)
class DashConfig:
    model: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # DDP steps fp32 master weights for a 16-bit model (dash/rl/optim.py); FSDP2 would step the bf16 shards
        # themselves, where updates at small lr round away. Refuse rather than train silently without effect.
        # fp16 needs loss scaling, which the trainer does not do: with the paper's step normaliser (~5e5 tokens) the
        # per-token gradients are ~1e-7, below fp16's smallest normal (6e-5), so backward would underflow to zeros.
        if self.model.dtype == "float16":
            raise ConfigError("model.dtype=float16 is not supported for training (no loss scaling: the small per-token "
                              "gradients underflow in fp16); use bfloat16 (same memory, fp32's exponent range)")
        if self.model.lora.enabled and self.train.parallel == "fsdp":  # frozen + trainable in one FSDP2 unit: untested
            raise ConfigError("model.lora.enabled=true with train.parallel=fsdp is not supported; use train.parallel="
                              "ddp (the adapters and their optimizer state are small, so replicas cost little)")
        if self.train.parallel == "fsdp" and self.model.dtype != "float32":
            raise ConfigError(f"train.parallel=fsdp needs model.dtype=float32 (got {self.model.dtype!r}): FSDP2 here "
                              "keeps no fp32 master weights, so 16-bit AdamW updates at small lr would round away")
        # With G samples, |A| is largest, (G - 1) / sqrt(G), when one sample differs from the rest (unbiased std; the
        # +1e-4 only lowers it): a filter at or above that drops every sample of every step.
        G = self.train.group_size
        max_adv = (G - 1) / math.sqrt(G)
        if self.train.algorithm == "dash" and self.loss.gradient_filtering and self.loss.adv_threshold >= max_adv:
            raise ConfigError(f"loss.adv_threshold={self.loss.adv_threshold:g} must be below {max_adv:.4g}, the "
                              f"largest |advantage| a group of train.group_size={G} can have: every sample would be "
                              "filtered and nothing learned")
        self._check_selection()

    def _check_selection(self) -> None:
        """The selection rule's limits that depend on other sections."""
        sel, G = self.loss.selection, self.train.group_size
        if sel.rule == "pods" and sel.pods_keep > G:
            raise ConfigError(f"loss.selection.pods_keep={sel.pods_keep} must be <= train.group_size={G}")
        if sel.rule == "dppo" and (self.loss.normalizer != "global" or self.loss.beta > 0):
            raise ConfigError(f"loss.selection.rule=dppo needs loss.normalizer=global and loss.beta=0 (got "
                              f"{self.loss.normalizer!r}, {self.loss.beta:g}): its 1/p re-weighting reaches the loss "
                              "through the advantage, so the KL term and a kept-rows normaliser would be biased")

    def check_for_training(self) -> None:
        """What only training needs (`dash sample` / eval may sample greedily): ConfigError naming the key."""
        s = self.sampling
        if s.temperature == 0 or s.top_k == 1:  # evaluation samples with its own settings (eval.*), unaffected
            key = "sampling.temperature=0" if s.temperature == 0 else "sampling.top_k=1"
            raise ConfigError(f"{key} samples greedily: the train.group_size={self.train.group_size} completions of "
                              "a prompt would be identical, every group advantage 0, and nothing learned; train "
                              "with temperature > 0 (evaluation has its own eval.temperature)")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Returns `value` checked against type `tp`, or raises ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not of type {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML `1` for a float field is fine; the reverse (1.5 for an int) is not
    if tp is float and isinstance(value, str):
        try:  # PyYAML (YAML 1.1) reads `3e-6` without a dot as a string; accept it for float fields only
            value = float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        quote = tp is str and isinstance(value, (dict, list))  # YAML read `{prompt}` as a mapping
        hint = " (in a YAML file, quote text that starts with { or [)" if quote else ""
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}{hint}")
    if tp is float and not math.isfinite(value):  # NaN passes every `< 0` range check, then poisons the run
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(value, _CommandLineText):
            value = _read_command_line(prefix + name, value, tp)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, got {value!r}")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


class _CommandLineText(str):
    """An override's value as typed; the field's type decides how it is read (`_read_command_line`)."""


def _is_text(tp: Any) -> bool:
    """True for str fields, choices of strings, and `str | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        return all(_is_text(a) for a in args if a is not type(None))
    return tp is str


def _read_command_line(key: str, text: str, tp: Any) -> Any:
    """A text field takes the text as given (`--data.prompt_template={prompt}` is not a YAML mapping); `null` / `~`
    still mean None where None is allowed. Other fields read it as a YAML scalar (numbers, booleans, null)."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if _is_text(tp) and not (optional and text in ("null", "~")):
        return str(text)
    if text == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--{key}={text}: not a value ({getattr(exc, 'problem', None) or exc})") from None


def parse_overrides(overrides: list[str]) -> dict:
    """`["--train.lr=1e-5"]` -> `{"train": {"lr": "1e-5"}}`: each value is kept as typed (a `_CommandLineText`)
    until the field's type is known; `load_config` then reads it (see `_read_command_line`)."""
    tree: dict = {}
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body or "." not in body.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        dotted, raw = body.split("=", 1)
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _CommandLineText(raw)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DashConfig:
    """Builds a DashConfig from defaults, an optional YAML file, and `--section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} " + ("is not a file" if path.exists() else "does not exist"))
        data = _read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return _build(DashConfig, data, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_scalar(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice (first on line "
                                                            f"{first[key] + 1})", key_node.start_mark)
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    """The file's YAML; a bad file is a one-line ConfigError `path:line:column: problem` (no parser trace)."""
    try:
        return yaml.load(path.read_bytes().decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from None


def config_to_dict(cfg: DashConfig) -> dict:
    """Plain nested dict (for logging and checkpoints); `load_config` of its YAML gives the same config."""
    return dataclasses.asdict(cfg)
