"""The trainer's data: a resumable prompt stream for training and a fixed held-out list for evaluation.

`data.task=arith` builds the built-in arithmetic task (dash/tasks/arith.py) from its seeded splits, and
`data.task=scratchpad` the built-in reasoning task (dash/tasks/scratchpad.py); `jsonl` /
`parquet` read local files, globs of shards or save_to_disk folders (`data.split` / `data.test_split` pick a
DatasetDict's split) through dash/data.py (bad rows skipped and counted, or an error with `data.strict`).
Without `data.test_path`, the last `data.test_size` rows of the shuffled training file are held out instead.

A prompt the sampler could not take would end the run at the step that draws it, so rows are checked here, at load:
a prompt must leave room for one new token in the model's context and, with a fixed KV pool (`sampling.num_pages`),
fit in the pool together with its completion (`prompt_token_limit`). Longer file rows are skipped and counted like
every other bad row (an error with `data.strict`); a built-in task whose prompts cannot fit is a ConfigError.
"""

from __future__ import annotations

import random
import sys

from dash.config import BUILTIN_TASKS, ConfigError, DataConfig, SamplingConfig
from dash.data import DatasetConfig, Example, PromptIterator, load_examples
from dash.data_sources import resolve_source
from dash.rewards import RewardSpecError, check_reward_columns
from dash.tasks.arith import ArithTaskConfig, make_splits
from dash.tasks.scratchpad import ScratchpadTaskConfig, make_scratchpad_splits


def prompt_token_limit(data: DataConfig, sampling: SamplingConfig | None, max_context: int | None) -> tuple[int, str]:
    """(longest usable prompt in tokens, which settings make it so); (0, "") when nothing limits it.

    The sampler caps a completion at the model's context, so a sequence needs min(prompt + max_new_tokens, context)
    slots of the KV pool: a fixed pool of at least `context` tokens holds every prompt the context does.
    """
    limits = []
    if data.max_prompt_tokens:
        limits.append((data.max_prompt_tokens, f"data.max_prompt_tokens={data.max_prompt_tokens}"))
    if max_context:  # room for at least one new token
        limits.append((max_context - 1, f"the model's context ({max_context}) - 1"))
    if sampling is not None and sampling.num_pages:
        capacity = sampling.num_pages * sampling.page_size
        if max_context is None or capacity < max_context:
            room = capacity - sampling.max_new_tokens
            what = (f"the KV pool (sampling.num_pages={sampling.num_pages} x sampling.page_size={sampling.page_size} "
                    f"= {capacity} tokens) - sampling.max_new_tokens={sampling.max_new_tokens}")
            if room < 1:
                raise ConfigError(f"{what} leaves no room for a prompt: raise sampling.num_pages, or set it to 0 (a "
                                  "pool sized from each step's batch)")
            limits.append((room, what))
    return min(limits) if limits else (0, "")


def _file_examples(cfg: DataConfig, key: str, tokenizer, limit: int, why: str) -> list[Example]:
    """The usable rows of `data.<key>` (train_path or test_path: a file, a glob or a save_to_disk folder)."""
    path, split_key = getattr(cfg, key), "split" if key == "train_path" else "test_split"
    ds = DatasetConfig(path=path, format="auto" if cfg.task == "jsonl" else "parquet", prompt_field=cfg.prompt_field,
                       answer_field=cfg.answer_field, prompt_template=cfg.prompt_template,
                       chat_template=cfg.chat_template, max_prompt_tokens=limit or None,
                       answer_parser=cfg.reward, strict=cfg.strict, split=getattr(cfg, split_key))
    try:  # data.strict: a row over the limit raises, naming it and the limit
        examples, stats = load_examples(ds, tokenizer, key=f"data.{key}", split_key=f"data.{split_key}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = stats.summary() + (f" (prompt_too_long: over {limit} tokens = {why})"
                                 if "prompt_too_long" in stats.skipped else "")
    if stats.skipped:
        print(f"data: {summary}", file=sys.stderr)
    if not examples:
        raise ConfigError(f"data: {path} has no usable rows ({summary}); read with data.prompt_field="
                          f"{cfg.prompt_field!r}, data.answer_field={cfg.answer_field!r}, data.reward={cfg.reward!r}")
    _check_reward_columns(cfg, examples, path)
    return examples


def _check_reward_columns(cfg: DataConfig, examples: list, source: str) -> None:
    """A TRL-form reward's required columns must be in every row: an error now, not a failed reward call each step."""
    try:
        check_reward_columns(cfg.reward, examples, source)
    except RewardSpecError as exc:
        raise ConfigError(f"data.reward: {exc}") from None


def arith_task(cfg: DataConfig):
    """The built-in task's settings from the data config: -> (ArithTaskConfig, train examples, test examples)."""
    try:
        task = ArithTaskConfig(form=cfg.arith_form, digits=cfg.arith_digits, seed=cfg.seed, test_size=cfg.test_size)
    except ValueError as exc:  # e.g. too few distinct problems for the split: name the keys that chose it
        raise ConfigError(f"data.arith_form={cfg.arith_form!r}, data.arith_digits={cfg.arith_digits}, "
                          f"data.test_size={cfg.test_size}: {exc}") from None
    return task, *make_splits(task)


def scratchpad_task(cfg: DataConfig):
    """The built-in reasoning task from the data config: -> (ScratchpadTaskConfig, train examples, test examples)."""
    task = ScratchpadTaskConfig(seed=cfg.seed, test_size=cfg.test_size)
    return task, *make_scratchpad_splits(task)


def builtin_task(cfg: DataConfig):
    """data.task=arith or scratchpad -> (task config, train examples, test examples)."""
    return scratchpad_task(cfg) if cfg.task == "scratchpad" else arith_task(cfg)


def load_task(cfg: DataConfig, tokenizer, max_context: int | None = None,
              sampling: SamplingConfig | None = None) -> tuple[PromptIterator, list]:
    """-> (training prompt stream, held-out examples); both hold objects with `.prompt` and `.answer`.
    `max_context` (the model's context length) and `sampling` (its KV pool): file rows whose prompt the sampler could
    not take are skipped and counted (see `prompt_token_limit`)."""
    limit, why = prompt_token_limit(cfg, sampling, max_context)
    if cfg.task in BUILTIN_TASKS:
        task, train, test = builtin_task(cfg)
        if sampling is not None and sampling.max_new_tokens < task.max_new_tokens:
            # a warning, not an error: a short budget is a legitimate way to rule out the scratchpad route
            print(f"warning: sampling.max_new_tokens={sampling.max_new_tokens} is below the {task.max_new_tokens} "
                  f"tokens the longest correct completion of data.task={cfg.task} needs; longer ones are cut and "
                  "score 0", file=sys.stderr)
        if limit and tokenizer is not None:
            # One prompt per character length, train included: a small test split may lack scratchpad's longest
            # (max_terms) prompts; arith's prompts all have one length.
            by_length = {len(e.prompt): e.prompt for e in train + test}
            n = max(len(tokenizer.encode(p)) for p in by_length.values())  # as the sampler encodes it
            if n > limit:
                raise ConfigError(f"the built-in task's prompts have {n} tokens, over the limit of {limit} = {why}")
        _check_reward_columns(cfg, train + test, "the built-in task")
        return PromptIterator(train, seed=cfg.seed), test
    if cfg.chat_template == "always" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template=always, but the model's tokenizer has no chat template")
    train = _file_examples(cfg, "train_path", tokenizer, limit, why)
    if cfg.test_path:
        test = _file_examples(cfg, "test_path", tokenizer, limit, why)[: cfg.test_size]
    else:
        if len(train) <= cfg.test_size:
            raise ConfigError(f"data: {cfg.train_path} has {len(train)} usable rows, not enough to hold out "
                             f"data.test_size={cfg.test_size}; give data.test_path or a smaller test_size")
        order = list(range(len(train)))
        random.Random(f"dash.heldout/{cfg.seed}").shuffle(order)
        test = [train[i] for i in order[-cfg.test_size:]]
        train = [train[i] for i in order[: -cfg.test_size]]
    return PromptIterator(train, seed=cfg.seed), test


def check_data_files(data: DataConfig, what: str = "") -> None:
    """Each of data.train_path / data.test_path that is set names a file, a glob that matches or a save_to_disk
    folder with the split asked for; ConfigError naming the key otherwise (`what` appended, e.g. who needs it)."""
    for key, split_key in (("train_path", "split"), ("test_path", "test_split")):
        if getattr(data, key):
            try:
                resolve_source(getattr(data, key), split=getattr(data, split_key), key=f"data.{key}",
                               split_key=f"data.{split_key}")
            except ValueError as exc:
                raise ConfigError(f"{exc}{what}") from None
