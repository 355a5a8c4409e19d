"""Local prompt/answer datasets (jsonl, parquet) and a resumable, epoch-aware batch iterator.

Purpose: turn a file of rows into `Example(prompt, answer, row)` for the trainer, and hand out prompts in a
seeded order that a checkpoint can restore exactly.

Loading (`load_examples`): each row's prompt field is rendered with `prompt_template` (`str.format` over the row's
fields, with `{prompt}` bound to the prompt field) and, if asked, the tokenizer's chat template (a single user turn
after an optional system prompt, with the generation prompt appended). The answer field goes through the reward's
answer parser (`dash.rewards.get_answer_parser`), so an unusable gold answer is caught at load time, not as a silent
0 reward. Bad rows are skipped and counted per reason in `LoadStats` with their first few row numbers (logged), or
raise `ValueError` naming the row and field when `strict=True`. Row numbers are 1-based line numbers for jsonl and
0-based row indices for parquet (`LoadStats.unit` says which). The path may also be a glob of shards or a folder
written by `datasets`' save_to_disk (dash/data_sources.py resolves it, with errors naming the config key); their
rows are 0-based, across shards in sorted order.

Iteration (`PromptIterator`): epoch e visits every example once in the order `random.Random(f"dash.data/{seed}/{e}")`
shuffles to; `next_batch(n)` continues across epoch ends, so a batch at the boundary may repeat a prompt of the
previous epoch. `state_dict()` / `load_state_dict()` save and restore (seed, epoch, position) exactly and refuse to
resume on a different dataset (size + content fingerprint).

Design limits: the whole file is loaded in memory (fine for MATH/GSM8K/MBPP sizes). Parquet needs pyarrow, imported
only when a parquet file is read. No sharding across data-parallel ranks here.
Departures from the paper: the paper left-truncates prompts to 256 tokens; we skip over-long prompts instead (a cut
problem statement is a different problem), and count them.

Run the tests: `python -m pytest tests/data -q`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dash.data_sources import DataSource, resolve_source, saved_records
from dash.rewards import get_answer_parser

logger = logging.getLogger(__name__)

# Why a row can be skipped, in the order the checks run.
SKIP_REASONS = (
    "bad_record",  # not a JSON object (jsonl)
    "missing_prompt",
    "missing_answer",
    "empty_prompt",  # empty, whitespace-only or not a string
    "template_error",  # the template names a field this row lacks
    "prompt_encode_error",  # the tokenizer cannot encode it (e.g. a character outside a char vocabulary)
    "prompt_too_long",
    "bad_answer",  # the reward's answer parser rejected it
)
# Row numbers kept per reason: enough to find the pattern in the file without flooding the log.
MAX_LOGGED_ROWS = 5
_PARQUET_BATCH_ROWS = 1024
_PARQUET_MAGIC = b"PAR1"  # the first (and last) 4 bytes of every parquet file


@dataclass(kw_only=True, slots=True)
class DatasetConfig:
    """Where a dataset lives and how rows become prompts and answers."""

    path: str
    """A .jsonl (one JSON object per line) or .parquet file, a glob of such shards (`data/train-*.parquet`), or a
    folder written by `datasets`' save_to_disk (dash/data_sources.py)."""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """`auto` picks by suffix: .parquet/.pq -> parquet, anything else -> jsonl (a saved folder says its own)."""
    split: str = "train"
    """The split read from a saved DatasetDict folder (ignored for files, globs and a saved Dataset)."""
    prompt_field: str = "prompt"
    """Row field holding the problem text."""
    answer_field: str = "answer"
    """Row field holding the reference answer (a string; numbers, lists and objects are JSON-encoded). "a,b,c" makes
    the answer a JSON object of those fields (a required, the others when present), e.g. MBPP's
    "test_list,test_imports" for the code reward."""
    prompt_template: str = "{prompt}"
    """`str.format` template over the row's fields; `{prompt}` is the prompt field. The paper: the raw problem."""
    chat_template: Literal["never", "auto", "always"] = "never"
    """Wrap in the tokenizer's chat template: `auto` if it has one, `always` requires one. The paper: never."""
    system_prompt: str | None = None
    """System turn for the chat template (ignored without it)."""
    max_prompt_tokens: int | None = None
    """Skip prompts longer than this many tokens (needs a tokenizer). The paper's limit is 256."""
    answer_parser: str | None = None
    """Reward name whose answer parser checks each gold answer (e.g. "gsm8k"); None keeps non-empty strings."""
    strict: bool = False
    """Raise ValueError on the first bad row instead of skipping it."""

    def __post_init__(self) -> None:
        if self.format not in ("auto", "jsonl", "parquet") or self.chat_template not in ("never", "auto", "always"):
            raise ValueError(f"DatasetConfig: bad format/chat_template in {self}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"DatasetConfig.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        problem = template_problem(self.prompt_template)
        if problem:
            raise ValueError(f"DatasetConfig.prompt_template {self.prompt_template!r} is invalid: {problem}")


class _AnyField(dict):
    """Accepts every field name: used to check a template's syntax without a row."""

    def __missing__(self, key: str) -> str:
        return ""


def template_problem(template: str) -> str | None:
    """Why `template` cannot render rows (bad `str.format` syntax, or no field at all, which would make every prompt
    the same text), or None."""
    try:
        template.format_map(_AnyField())
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except (ValueError, IndexError, AttributeError, TypeError) as exc:
        return str(exc)
    if not fields:
        return "it names no field (e.g. {prompt}), so every prompt would be the same text"
    return None


@dataclass(frozen=True, slots=True)
class Example:
    """One usable row. Attributes: prompt: the rendered prompt; answer: the parsed gold answer; row: where it was;
    columns: the row's fields as read (TRL-form rewards get them, dash/rewards/user.py; not compared or hashed)."""

    prompt: str
    answer: str
    row: int
    columns: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class LoadStats:
    """What loading kept and skipped. `first_rows[reason]` has the first MAX_LOGGED_ROWS row numbers."""

    path: str
    unit: str
    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, row: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < MAX_LOGGED_ROWS:
            rows.append(row)

    def summary(self) -> str:
        parts = [f"{r}={n} ({self.unit}s {', '.join(map(str, self.first_rows[r]))}{', ...' if n > len(self.first_rows[r]) else ''})"
                 for r, n in self.skipped.items()]  # fmt: skip
        return f"{self.path}: kept {self.kept}/{self.rows} rows" + (f"; skipped {'; '.join(parts)}" if parts else "")


def read_records(path: str | Path, fmt: str = "auto", *, split: str = "train", key: str = "path",
                 split_key: str = "split") -> Iterator[tuple[int, Any]]:
    """(row number, record) for each row of a file, a glob of shards or a save_to_disk folder (dash/data_sources.py,
    whose errors name `key` / `split_key`); a jsonl line that is not valid JSON yields its ValueError as the record.
    Rows are 1-based lines of a single jsonl file, else 0-based rows (across shards, in sorted path order)."""
    for _, row, record in _source_records(resolve_source(path, fmt=fmt, split=split, key=key, split_key=split_key),
                                          key):
        yield row, record


def _source_records(source: DataSource, key: str) -> Iterator[tuple[str, int, Any]]:
    """(where, row, record): `where` names the shard and its own line/row, for errors."""
    if source.kind == "saved":
        for row, record in saved_records(source, key):
            yield f"{source.spec}: row {row}", row, record
        return
    if not source.sharded:
        unit = "line" if source.kind == "jsonl" else "row"
        for row, record in _file_records(source.files[0], source.kind):
            yield f"{source.spec}: {unit} {row}", row, record
        return
    row = 0
    for shard in source.files:
        for own_row, record in _file_records(shard, source.kind):
            yield f"{shard}: {'line' if source.kind == 'jsonl' else 'row'} {own_row}", row, record
            row += 1


def _file_records(path: Path, fmt: str) -> Iterator[tuple[int, Any]]:
    """One file's rows: (1-based line, record) for jsonl, (0-based row, record) for parquet."""
    if fmt == "parquet":
        yield from _parquet_records(path)
        return
    with path.open("rb") as f:  # decoded line by line: one bad line costs that line, not the file
        if f.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC:  # else every "line" of it is a bad row: say why at once
            raise ValueError(f"{path}: is a parquet file, not JSON lines (read it with data.task=parquet)")
        f.seek(0)
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except ValueError as exc:
                    yield line_no, exc
                except RecursionError:  # json's recursive decoder on absurdly nested input
                    yield line_no, ValueError("JSON nested too deeply")


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow as pa  # optional dependency (extra `data`): only parquet files need it
        import pyarrow.parquet as pq  # optional dependency, as above
    except ImportError as exc:
        raise ImportError(f"reading the parquet file {path} needs pyarrow: pip install pyarrow") from exc

    row = 0
    try:  # pyarrow's errors name no file ("Parquet magic bytes not found in footer"): say which one, and why
        batches = pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        for batch in batches:
            for record in batch.to_pylist():
                yield row, record
                row += 1
    except (pa.ArrowException, OSError) as exc:
        hint = ""
        with path.open("rb") as f:
            if f.read(1) in (b"{", b"["):
                hint = "; it looks like JSON lines, not parquet"
        raise ValueError(f"{path}: not a readable parquet file after {row} rows ({exc}){hint}") from None


def _as_answer(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _render(cfg: DatasetConfig, record: dict, tokenizer: Any, use_chat: bool) -> str:
    text = cfg.prompt_template.format_map({**record, "prompt": record[cfg.prompt_field]})
    if not use_chat:
        return text
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
        {"role": "user", "content": text}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_row(cfg: DatasetConfig, record: Any, tokenizer: Any, use_chat: bool, parser) -> tuple[str, Any]:
    """(reason, detail) for a bad row, or ("", Example fields) for a good one."""
    if not isinstance(record, dict):
        return "bad_record", record
    if record.get(cfg.prompt_field) is None:
        return "missing_prompt", cfg.prompt_field
    answer_fields = [f.strip() for f in cfg.answer_field.split(",")]
    if record.get(answer_fields[0]) is None:
        return "missing_answer", answer_fields[0]
    raw_prompt = record[cfg.prompt_field]
    if not isinstance(raw_prompt, str) or not raw_prompt.strip():
        return "empty_prompt", cfg.prompt_field
    try:
        prompt = _render(cfg, record, tokenizer, use_chat)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        return "template_error", exc
    if cfg.max_prompt_tokens is not None:
        try:
            n_tokens = len(tokenizer.encode(prompt))  # as the sampler encodes it: a BOS it adds counts
        except Exception as exc:  # noqa: BLE001 -- tokenizers raise several types; any of them means "cannot feed this prompt"
            return "prompt_encode_error", exc
        if n_tokens > cfg.max_prompt_tokens:
            return "prompt_too_long", f"{n_tokens} tokens > {cfg.max_prompt_tokens}"
    try:
        raw = record[answer_fields[0]]
        if len(answer_fields) > 1:
            raw = {f: record[f] for f in answer_fields if record.get(f) is not None}
        answer = parser(_as_answer(raw))
    except Exception as exc:  # noqa: BLE001 -- a parser bug on one row should cost that row, not the load
        return "bad_answer", exc
    if answer is None:
        return "bad_answer", cfg.answer_field
    return "", (prompt, answer)


def load_examples(cfg: DatasetConfig, tokenizer: Any = None, *, key: str = "DatasetConfig.path",
                  split_key: str = "DatasetConfig.split") -> tuple[list[Example], LoadStats]:
    """Read `cfg.path` into examples; bad rows are skipped and counted (or raise if `cfg.strict`). A path problem is
    a ValueError naming `key` (or `split_key`), raised before any row is read."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat_template == "always" and not has_chat:
        raise ValueError("DatasetConfig.chat_template='always' but the tokenizer has no chat template")
    if cfg.max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("DatasetConfig.max_prompt_tokens needs a tokenizer to count tokens")
    use_chat = has_chat and cfg.chat_template != "never"
    parser = get_answer_parser(cfg.answer_parser) if cfg.answer_parser else (lambda s: s if s.strip() else None)
    source = resolve_source(cfg.path, fmt=cfg.format, split=cfg.split, key=key, split_key=split_key)
    one_jsonl = source.kind == "jsonl" and not source.sharded
    stats = LoadStats(path=str(cfg.path), unit="line" if one_jsonl else "row")
    examples: list[Example] = []
    for where, row, record in _source_records(source, key):
        stats.rows += 1
        reason, detail = _check_row(cfg, record, tokenizer, use_chat, parser)
        if not reason:
            examples.append(Example(prompt=detail[0], answer=detail[1], row=row, columns=record))
            continue
        if cfg.strict:
            raise ValueError(f"{where}: {reason}: {detail!r:.200}")
        stats.skip(reason, row)
    stats.kept = len(examples)
    if stats.skipped:
        logger.warning("%s", stats.summary())
    return examples, stats


class PromptIterator:
    """Seeded, epoch-aware stream of examples whose position can be saved and restored exactly."""

    def __init__(self, examples: Sequence[Example], *, seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise ValueError("PromptIterator needs at least one example (did every row get skipped?)")
        self.examples, self.seed, self.shuffle = list(examples), int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._fingerprint = hashlib.sha256(
            json.dumps([(e.prompt, e.answer) for e in self.examples]).encode()
        ).hexdigest()[:16]
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:  # a string seed is hashed with SHA-512: the same order on every machine and Python 3.x
            random.Random(f"dash.data/{self.seed}/{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Example]:
        """The next `n` examples, moving into the next epoch (new order) when this one runs out."""
        if n < 1:
            raise ValueError(f"next_batch needs n >= 1, got {n}")
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(batch), len(self._order) - self.position)
            batch += [self.examples[i] for i in self._order[self.position : self.position + take]]
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position,
                "num_examples": len(self.examples), "fingerprint": self._fingerprint}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; ValueError if it was saved on other data."""
        if state["num_examples"] != len(self.examples) or state["fingerprint"] != self._fingerprint:
            raise ValueError(
                f"data state was saved for {state['num_examples']} examples (fingerprint {state['fingerprint']}), "
                f"this dataset has {len(self.examples)} ({self._fingerprint}): refusing an inexact resume"
            )
        if not 0 <= state["position"] <= len(self.examples) or state["epoch"] < 0:
            raise ValueError(f"data state has an impossible position: {state}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
