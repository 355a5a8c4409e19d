"""SFT data: prompt + solution rows from the user's file, tokenized as RL sees them, and packed end to end.

Purpose: `dash sft` on a jsonl / parquet file (the paper's SFT-H baseline on your own solutions). Rows are read by
dash/data.py's `load_examples` (the loader RL uses), so the prompt goes through the same `data.prompt_template` and
`data.chat_template` as in RL; the solution field takes the place of the answer field, kept as written.

Tokenization matches what RL trains on: the prompt is encoded exactly as the sampler encodes it (`tokenizer.encode`,
with the tokenizer's own specials such as a BOS), the solution without specials and, with `sft.append_eos`, followed
by the EOS token (the stop RL's completions end with). Prompt and solution are encoded apart, as the sampler's
completions are, not as one string (a BPE merge across the seam would give tokens RL never produces).

Bad input fails before any weight is read, naming the file, the row and the field: a missing file, a field no row has
(the fields the first row does have are listed), a row without a prompt or solution or with an empty solution, no
usable rows. Rows skipped for other reasons (a template field the row lacks, a prompt over data.max_prompt_tokens, a
sequence over the model's context, text the tokenizer cannot encode) are counted on stderr, or are an error naming
the row with `data.strict=true`. Row numbers are dash/data.py's: 1-based lines for jsonl, 0-based rows for parquet.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from dash.config import BUILTIN_TASKS, ConfigError, DashConfig
from dash.data import DatasetConfig, Example, load_examples, read_records

# load_examples' skip reasons that mean the row lacks what SFT needs: always an error, never a silent skip.
_MISSING = {"missing_prompt": "no prompt field", "missing_answer": "no solution field",
            "empty_prompt": "an empty prompt", "bad_answer": "an empty solution"}
_GLOB_CHARS = "*?["  # a pattern is resolved by dash.data, not checked here as one file


@dataclass(frozen=True, slots=True)
class PackedSFTBatch:
    """Sequences (prompt + solution) packed end to end.

    Attributes:
        input_ids: [T] int64 token ids of all sequences, concatenated.
        cu_seqlens: [B+1] int32 start offsets of each sequence; cu_seqlens[-1] == T.
        positions: [T] int64 position of each token inside its own sequence.
        targets: [T] int64 the next token within the same sequence (0 where there is none).
        loss_mask: [T] bool True where the target is a solution token, i.e. where the loss applies.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> PackedSFTBatch:
        return PackedSFTBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack_sft_ids(pairs: Sequence[tuple[list[int], list[int]]]) -> PackedSFTBatch:
    """Pack (prompt ids, solution ids) pairs; see PackedSFTBatch for the layout."""
    if not pairs:
        raise ValueError("pack_sft_ids: need at least one (prompt, solution) pair")
    ids, pos, tgt, mask, cu = [], [], [], [], [0]
    for p, c in pairs:
        seq = list(p) + list(c)
        n = len(seq)
        ids += seq
        pos += range(n)
        # Position t predicts seq[t+1]; it counts iff seq[t+1] is a solution token (t + 1 >= len(p)).
        tgt += seq[1:] + [0]
        mask += [len(p) <= t + 1 < n for t in range(n)]
        cu.append(cu[-1] + n)
    return PackedSFTBatch(input_ids=torch.tensor(ids, dtype=torch.long),
                          cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                          positions=torch.tensor(pos, dtype=torch.long),
                          targets=torch.tensor(tgt, dtype=torch.long),
                          loss_mask=torch.tensor(mask, dtype=torch.bool))


def tokenize_pairs(tokenizer, prompts: Sequence[str], solutions: Sequence[str],
                   append_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids as the sampler encodes them, solution ids [+ EOS]) per pair; see the module docstring."""
    if len(prompts) != len(solutions):
        raise ValueError(f"need equal numbers of prompts and solutions, got {len(prompts)}/{len(solutions)}")
    p_ids = tokenizer(list(prompts))["input_ids"]  # the specials tokenizer.encode adds, as the sampler's
    s_ids = tokenizer(list(solutions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("sft.append_eos=true but the tokenizer has no eos_token_id")
    return [(p, s + [eos] if append_eos and (not s or s[-1] != eos) else s) for p, s in zip(p_ids, s_ids)]


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Consecutive index groups whose summed lengths stay within `token_budget` (0: one group of all)."""
    if not token_budget:
        return [list(range(len(lengths)))]
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > token_budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return groups + [cur] if cur else groups


def sft_source(cfg: DashConfig) -> tuple[str, str, str] | None:
    """(config key, path, dash.data format) of the SFT rows; None: the built-in task's warm start."""
    if cfg.sft.train_path:
        return "sft.train_path", cfg.sft.train_path, "auto"
    if cfg.data.task not in BUILTIN_TASKS:
        return "data.train_path", cfg.data.train_path, "auto" if cfg.data.task == "jsonl" else "parquet"
    return None


def check_sft_source(cfg: DashConfig) -> None:
    """The cheap checks, before any model or data is read: the file exists, the field names are usable."""
    key, path, _ = sft_source(cfg)
    if not any(c in path for c in _GLOB_CHARS) and not Path(path).exists():
        raise ConfigError(f"{key}: no such file {path}")
    if "," in cfg.sft.solution_field:  # dash.data would read "a,b" as a JSON object of two fields
        raise ConfigError(f"sft.solution_field={cfg.sft.solution_field!r}: one field name, without commas")


def _first_fields(path: str, fmt: str, split: str) -> str:
    """The first row's field names, for an error message; '' when they cannot be read."""
    try:
        for _, record in read_records(path, fmt, split=split):
            return f" (the first row has: {', '.join(map(str, record))})" if isinstance(record, dict) else ""
    except (OSError, ValueError, ImportError):
        pass
    return ""


def load_sft_examples(cfg: DashConfig, tokenizer, max_context: int) -> list[Example]:
    """The SFT rows as Examples (prompt: rendered; answer: the solution text; columns: {"prompt_ids", "solution_ids"}
    as tokenize_pairs gives them). ConfigError naming the file, row and field for bad input (module docstring)."""
    key, path, fmt = sft_source(cfg)
    prompt_field = cfg.sft.prompt_field or cfg.data.prompt_field
    fields_used = {"missing_prompt": f"{'sft' if cfg.sft.prompt_field else 'data'}.prompt_field={prompt_field!r}",
                   "missing_answer": f"sft.solution_field={cfg.sft.solution_field!r}"}
    fields_used.update(empty_prompt=fields_used["missing_prompt"], bad_answer=fields_used["missing_answer"])
    if cfg.data.chat_template == "always" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template=always, but the model's tokenizer has no chat template")
    ds = DatasetConfig(path=path, format=fmt, prompt_field=prompt_field, answer_field=cfg.sft.solution_field,
                       prompt_template=cfg.data.prompt_template, chat_template=cfg.data.chat_template,
                       max_prompt_tokens=cfg.data.max_prompt_tokens or None, answer_parser=None, strict=False,
                       split=cfg.data.split)
    try:  # a file, a glob of shards or a save_to_disk folder (dash/data.py); path errors name `key`
        examples, stats = load_examples(ds, tokenizer, key=key, split_key="data.split")
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc) if key in str(exc) else f"{key}: {exc}") from None
    for reason, what in _MISSING.items():
        n = stats.skipped.get(reason, 0)
        if n == stats.rows and n and reason.startswith("missing"):  # no row at all has it: a wrong field name
            raise ConfigError(f"{key}: no row of {path} has the field of {fields_used[reason]}"
                              f"{_first_fields(path, fmt, cfg.data.split)}")
        if n:
            rows = stats.first_rows[reason]
            raise ConfigError(f"{key}: {path} {stats.unit} {rows[0]} has {what} ({fields_used[reason]}); "
                              f"{n} row(s) like it, e.g. {stats.unit}s {', '.join(map(str, rows))}")
    skipped = dict(stats.skipped)
    if skipped and cfg.data.strict:
        reason = next(iter(skipped))
        raise ConfigError(f"{key}: {path} {stats.unit} {stats.first_rows[reason][0]}: {reason} (data.strict=true)")
    out = _tokenized(cfg, key, path, stats.unit, examples, tokenizer, max_context, skipped)
    if skipped:
        print(f"sft data: {path}: kept {len(out)}/{stats.rows} rows; skipped {skipped}", file=sys.stderr)
    if not out:
        raise ConfigError(f"{key}: {path} has no usable rows ({stats.rows} read, skipped {skipped})")
    return out


def _tokenized(cfg, key, path, unit, examples, tokenizer, max_context, skipped) -> list[Example]:
    """`examples` with their token ids; rows the tokenizer cannot encode or over the context are counted out."""
    a = cfg.sft.append_eos
    if a and tokenizer.eos_token_id is None:
        raise ConfigError("sft.append_eos=true, but the model's tokenizer has no EOS token (set sft.append_eos=false "
                          "if the solutions carry their own end marker)")
    try:
        pairs = tokenize_pairs(tokenizer, [e.prompt for e in examples], [e.answer for e in examples], a)
    except Exception:  # noqa: BLE001 -- the tokenizers library raises a bare Exception; find the rows one by one
        pairs = []
        for e in examples:
            try:
                pairs += tokenize_pairs(tokenizer, [e.prompt], [e.answer], a)
            except Exception as exc:  # noqa: BLE001 -- as above
                pairs.append(exc)
    out = []
    for e, pair in zip(examples, pairs, strict=True):
        reason = ("encode_error" if isinstance(pair, Exception)
                  else "over_context" if len(pair[0]) + len(pair[1]) > max_context else "")
        if reason and cfg.data.strict:
            detail = pair if reason == "encode_error" else f"{len(pair[0]) + len(pair[1])} tokens > {max_context}"
            raise ConfigError(f"{key}: {path} {unit} {e.row}: {reason} ({detail}) (data.strict=true)")
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        out.append(Example(prompt=e.prompt, answer=e.answer, row=e.row,
                           columns={"prompt_ids": pair[0], "solution_ids": pair[1]}))
    return out
