"""The eval section's test sets: which run, checked before any work, loaded once, each scored by its own reward.

    eval:
      sets:
        math500: {path: data/math500.jsonl, reward: math}
        gsm8k:   {path: data/gsm8k_test.parquet, reward: gsm8k, prompt_field: question}
        heldout: {}                    # path null: the data section's held-out prompts

An empty `eval.sets` stands for one set, `heldout` (HELDOUT_SET): the built-in task's test split, data.test_path, or
the rows held out of data.train_path, as training has always evaluated. `eval.select` picks some of the sets by name.
A set's path (a jsonl / parquet file, a glob of shards, a save_to_disk folder: dash/data_sources.py) is read by
dash.data.load_examples with the data section's fields, template and chat template unless the
set names its own; its gold answers are parsed by its reward's parser. Rows whose prompt leaves no room for eval's
max_new_tokens in the model's context are skipped and counted, as in training.

Every set samples with `eval_sampling(cfg)`: the training sampler's KV-pool geometry with eval's temperature, top-p,
top-k and max_new_tokens, and no min_new_tokens (a training-time nudge that would bias answer lengths).

Bad input fails before any weight loads (`check_eval_sets`): a missing file names the set, the key and the path; a
fixed KV pool (sampling.num_pages) that cannot hold a held-out prompt with eval's longer answers is refused.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from dash.config import BUILTIN_TASKS, HELDOUT_SET, ConfigError, DashConfig, EvalSetConfig, SamplingConfig
from dash.data import DatasetConfig, Example, load_examples
from dash.data_sources import resolve_source
from dash.rewards import RewardSpecError, check_reward_columns, get_reward
from dash.rl.rollout_sampler import RolloutSampler
from dash.rl.task_data import check_data_files, load_task, prompt_token_limit


@dataclass(slots=True)
class EvalSet:
    """One named test set, ready to evaluate.

    Attributes:
        name: the key in eval.sets (metrics are `eval/<name>/...`).
        examples: its prompts and parsed answers (`.prompt`, `.answer`, the row's columns for TRL-form rewards).
        sampler: generates at eval's sampling settings and scores with the set's reward.
        source: where the examples came from (a path, or `held-out split`), for the results file.
        reward: the reward spec scoring it.
    """

    name: str
    examples: list
    sampler: RolloutSampler
    source: str
    reward: str


def selected_sets(cfg: DashConfig) -> dict[str, EvalSetConfig]:
    """The sets to run, name -> settings, in eval.select's order (config.py checked every name exists)."""
    specs = cfg.eval.sets or {HELDOUT_SET: EvalSetConfig()}
    return {name: specs[name] for name in cfg.eval.selected_names(list(specs))}


def eval_sampling(cfg: DashConfig) -> SamplingConfig:
    """The training sampler's settings with eval's own temperature / top-p / top-k / max_new_tokens."""
    e, s = cfg.eval, cfg.sampling
    return dataclasses.replace(s, temperature=e.temperature, top_p=e.top_p, top_k=e.top_k,
                               max_new_tokens=e.max_new_tokens or s.max_new_tokens, min_new_tokens=0)


def check_eval_sets(cfg: DashConfig, max_context: int | None = None) -> None:
    """Before any weights or data load: every selected set's file exists, and eval's answers fit the model's context
    (`max_context`, read from its config.json) and a fixed KV pool. ConfigError naming the key otherwise."""
    selected = selected_sets(cfg)
    # the held-out set's files
    if cfg.data.task not in BUILTIN_TASKS and any(spec.path is None for spec in selected.values()):
        check_data_files(cfg.data, " (the held-out eval set)")
    for name, spec in selected.items():
        if spec.path is not None:  # a file, a glob that matches, or a save_to_disk folder with the split asked for
            try:
                resolve_source(spec.path, fmt=spec.format, split=spec.split, **_keys(name))
            except ValueError as exc:
                raise ConfigError(f"{exc} (eval set {name!r})") from None
    sampling = eval_sampling(cfg)
    if max_context is not None and sampling.max_new_tokens >= max_context:
        key = "eval.max_new_tokens" if cfg.eval.max_new_tokens else "sampling.max_new_tokens"
        raise ConfigError(f"{key}={sampling.max_new_tokens} (eval's answer limit) must be below the model's context "
                          f"({max_context} tokens), which also holds the prompt")
    # The held-out prompts were sized at load for the training sampler's (shorter) answers.
    if sampling.num_pages and sampling.max_new_tokens > cfg.sampling.max_new_tokens:
        if any(spec.path is None for spec in selected.values()):
            raise ConfigError(f"eval.max_new_tokens={sampling.max_new_tokens} is above sampling.max_new_tokens="
                              f"{cfg.sampling.max_new_tokens} with a fixed KV pool (sampling.num_pages="
                              f"{cfg.sampling.num_pages}): the held-out prompts may not fit with the longer answers; "
                              "set sampling.num_pages=0 (a pool sized per call) or a smaller eval.max_new_tokens")


def _keys(name: str) -> dict[str, str]:
    """The config keys dash.data_sources names in its errors about set `name`'s path."""
    return {"key": f"eval.sets.{name}.path", "split_key": f"eval.sets.{name}.split"}


def _file_examples(cfg: DashConfig, name: str, spec: EvalSetConfig, tokenizer, max_context: int) -> list[Example]:
    data = cfg.data
    reward = spec.reward or data.reward
    limit, why = prompt_token_limit(data, eval_sampling(cfg), max_context)
    ds = DatasetConfig(path=spec.path, format=spec.format, split=spec.split,
                       prompt_field=spec.prompt_field or data.prompt_field,
                       answer_field=spec.answer_field or data.answer_field,
                       prompt_template=spec.prompt_template or data.prompt_template,
                       chat_template=spec.chat_template or data.chat_template, max_prompt_tokens=limit or None,
                       answer_parser=reward, strict=data.strict)
    try:
        examples, stats = load_examples(ds, tokenizer, **_keys(name))
    except (OSError, ValueError) as exc:  # unreadable file, a bad row with data.strict, no chat template
        raise ConfigError(f"eval.sets.{name}: {exc}") from None
    if stats.skipped:
        print(f"eval set {name}: {stats.summary()} (prompt limit {limit} tokens = {why})", file=sys.stderr)
    if not examples:
        raise ConfigError(f"eval.sets.{name}: {spec.path} has no usable rows ({stats.summary()}); read with "
                          f"prompt_field={ds.prompt_field!r}, answer_field={ds.answer_field!r}, reward={reward!r}")
    try:
        check_reward_columns(reward, examples, str(spec.path))
    except RewardSpecError as exc:
        raise ConfigError(f"eval.sets.{name}.reward: {exc}") from None
    return examples


def load_eval_sets(cfg: DashConfig, tokenizer, model, heldout: list | None = None) -> dict[str, EvalSet]:
    """The selected sets, loaded, each with a sampler over `model` (used in place, never copied).

    Args:
        heldout: the data section's held-out examples when the caller has them (the trainer); None loads them here
            when a selected set needs them (`dash eval`).
    """
    context = model.config.max_position_embeddings
    sampling = eval_sampling(cfg)
    out = {}
    for name, spec in selected_sets(cfg).items():
        if spec.path is None:
            if heldout is None:
                heldout = load_task(cfg.data, tokenizer, context, cfg.sampling)[1]
            examples, source = heldout, "held-out split"
        else:
            examples, source = _file_examples(cfg, name, spec, tokenizer, context), spec.path
        if spec.limit:
            examples = examples[:spec.limit]
        reward = spec.reward or cfg.data.reward
        sampler = RolloutSampler(model, tokenizer, sampling, get_reward(reward),
                                 reward_timeout_s=cfg.data.reward_timeout_s)
        out[name] = EvalSet(name, list(examples), sampler, str(source), reward)
    return out
