"""The trainer's data: a resumable prompt stream for training and a fixed held-out list for evaluation.

`data.task=arith` builds the built-in arithmetic task (dash/tasks/arith.py) from its seeded splits; `jsonl` /
`parquet` read local files through dash/data.py (bad rows skipped and counted, or an error with `data.strict`).
Without `data.test_path`, the last `data.test_size` rows of the shuffled training file are held out instead.
"""

from __future__ import annotations

import random
import sys

from dash.config import DataConfig
from dash.data import DatasetConfig, Example, PromptIterator, load_examples


def _file_examples(cfg: DataConfig, path: str, tokenizer, max_context: int | None) -> list[Example]:
    # A prompt must leave the model room for at least one new token (the sampler refuses it otherwise, mid-run): with
    # the model's context known, longer prompts are skipped at load even when data.max_prompt_tokens is 0 (off).
    limits = [n for n in (cfg.max_prompt_tokens, max_context - 1 if max_context else 0) if n > 0]
    ds = DatasetConfig(path=path, format="auto" if cfg.task == "jsonl" else "parquet", prompt_field=cfg.prompt_field,
                       answer_field=cfg.answer_field, prompt_template=cfg.prompt_template,
                       chat_template=cfg.chat_template, max_prompt_tokens=min(limits) if limits else None,
                       answer_parser=cfg.reward.split("+")[0].strip(), strict=cfg.strict)
    examples, stats = load_examples(ds, tokenizer)
    if stats.skipped:
        print(f"data: {path}: {stats.summary()}", file=sys.stderr)
    if not examples:
        raise ValueError(f"data: {path} has no usable rows ({stats.summary()})")
    return examples


def arith_task(cfg: DataConfig):
    """The built-in task's settings from the data config: -> (ArithTaskConfig, train examples, test examples)."""
    from dash.tasks.arith import ArithTaskConfig, make_splits

    task = ArithTaskConfig(form=cfg.arith_form, digits=cfg.arith_digits, seed=cfg.seed, test_size=cfg.test_size)
    return task, *make_splits(task)


def load_task(cfg: DataConfig, tokenizer, max_context: int | None = None) -> tuple[PromptIterator, list]:
    """-> (training prompt stream, held-out examples); both hold objects with `.prompt` and `.answer`.
    `max_context`: the model's context length; file rows whose prompt does not fit below it are skipped."""
    if cfg.task == "arith":
        _, train, test = arith_task(cfg)
        return PromptIterator(train, seed=cfg.seed), test
    train = _file_examples(cfg, cfg.train_path, tokenizer, max_context)
    if cfg.test_path:
        test = _file_examples(cfg, cfg.test_path, tokenizer, max_context)[: cfg.test_size]
    else:
        if len(train) <= cfg.test_size:
            raise ValueError(f"data: {cfg.train_path} has {len(train)} usable rows, not enough to hold out "
                             f"data.test_size={cfg.test_size}; give data.test_path or a smaller test_size")
        order = list(range(len(train)))
        random.Random(f"dash.heldout/{cfg.seed}").shuffle(order)
        test = [train[i] for i in order[-cfg.test_size:]]
        train = [train[i] for i in order[: -cfg.test_size]]
    return PromptIterator(train, seed=cfg.seed), test
