"""Data: a bad row is skipped and counted by reason (a long run never dies on one row), or with `strict` an error
naming its line; a bad file is one error naming it; a prompt the model's context or a fixed KV pool cannot hold is
caught at load, with the limit and the settings behind it named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dash.config import ConfigError, DashConfig, DataConfig, SamplingConfig
from dash.data import DatasetConfig, load_examples
from dash.rl.task_data import load_task, prompt_token_limit
from dash.tokenizer import build_arith_tokenizer

GOOD = json.dumps({"prompt": "1+2", "answer": "3"}).encode()
TOO_LONG = "1+" * 10 + "1"  # 21 characters, 22 tokens with the template's "=": over the limit of 12 below


def _row(**fields) -> bytes:
    return json.dumps(fields).encode()


# (raw line, reason it is skipped for). One bad line between two good ones; arith answers, char tokenizer.
BAD_ROWS = [
    (b"not json", "bad_record"),
    (b"[1, 2]", "bad_record"),
    (b'"just a string"', "bad_record"),
    (b'{"prompt": "\xff\xfe", "answer": "3"}', "bad_record"),  # not UTF-8
    (b"[" * 100_000, "bad_record"),  # nested past json's recursion limit
    (_row(answer="3"), "missing_prompt"),
    (_row(prompt=None, answer="3"), "missing_prompt"),
    (_row(prompt="1+2"), "missing_answer"),
    (_row(prompt="1+2", answer=None), "missing_answer"),
    (_row(prompt="", answer="3"), "empty_prompt"),
    (_row(prompt="   ", answer="3"), "empty_prompt"),
    (_row(prompt=12, answer="3"), "empty_prompt"),
    (_row(prompt=["1+2"], answer="3"), "empty_prompt"),
    (_row(prompt="1+a", answer="3"), "prompt_encode_error"),  # a character outside the vocabulary
    (_row(prompt="1 + 2", answer="3"), "prompt_encode_error"),
    (_row(prompt=TOO_LONG, answer="11"), "prompt_too_long"),
    (_row(prompt="1+2", answer="three"), "bad_answer"),
    (_row(prompt="1+2", answer="-3"), "bad_answer"),
    (_row(prompt="1+2", answer=True), "bad_answer"),
    (_row(prompt="1+2", answer=[3]), "bad_answer"),
]


def _cfg(path: Path, **kw) -> DatasetConfig:
    base = dict(path=str(path), prompt_template="{prompt}=", max_prompt_tokens=12, answer_parser="arith")
    return DatasetConfig(**{**base, **kw})


@pytest.mark.parametrize("line,reason", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD_ROWS)])
def test_bad_row_is_skipped_and_counted(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([GOOD, line, GOOD]) + b"\n")
    examples, stats = load_examples(_cfg(path), tokenizer=build_arith_tokenizer())
    assert [e.row for e in examples] == [1, 3] and stats.skipped == {reason: 1} and stats.first_rows[reason] == [2]
    assert f"{reason}=1 (lines 2)" in stats.summary()


@pytest.mark.parametrize("line,reason", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r) in enumerate(BAD_ROWS)])
def test_bad_row_in_strict_mode_names_the_line(tmp_path, line, reason):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([GOOD, line, GOOD]) + b"\n")
    with pytest.raises(ValueError, match=rf"rows\.jsonl: line 2: {reason}"):
        load_examples(_cfg(path, strict=True), tokenizer=build_arith_tokenizer())


def test_row_missing_a_template_field_is_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([_row(prompt="1+2", answer="3", eq="="), GOOD]) + b"\n")
    examples, stats = load_examples(_cfg(path, prompt_template="{prompt}{eq}"), tokenizer=build_arith_tokenizer())
    assert len(examples) == 1 and stats.skipped == {"template_error": 1} and stats.first_rows["template_error"] == [2]


# ---------------------------------------------------------------- bad files: one error naming the file


def _parquet(tmp_path: Path, rows: int = 3000) -> Path:
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: parquet cases need it (pip install pyarrow)")
    import pyarrow.parquet as pq

    path = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"1+{i}", "answer": str(i + 1)} for i in range(rows)]), path)
    return path


@pytest.mark.parametrize("kind,match", [
    ("jsonl_as_parquet", r"data\.jsonl: not a readable parquet file after 0 rows .*looks like JSON lines"),
    ("jsonl_named_parquet", r"rows\.parquet: not a readable parquet file .*looks like JSON lines"),
    ("corrupt_parquet", r"bad\.parquet: not a readable parquet file after 0 rows \(Parquet magic bytes"),
    ("truncated_parquet", r"cut\.parquet: not a readable parquet file"),
    ("parquet_as_jsonl", r"good\.parquet: is a parquet file, not JSON lines \(read it with data\.task=parquet\)"),
])
def test_unreadable_data_file_names_it(tmp_path, kind, match):
    _parquet(tmp_path)
    good = tmp_path / "good.parquet"
    if kind == "jsonl_as_parquet":
        cfg = DatasetConfig(path=str(tmp_path / "data.jsonl"), format="parquet")
        Path(cfg.path).write_bytes(GOOD + b"\n")
    elif kind == "jsonl_named_parquet":
        cfg = DatasetConfig(path=str(tmp_path / "rows.parquet"))
        Path(cfg.path).write_bytes(GOOD + b"\n")
    elif kind == "corrupt_parquet":
        cfg = DatasetConfig(path=str(tmp_path / "bad.parquet"))
        Path(cfg.path).write_bytes(b"\x00garbage" * 50)
    elif kind == "truncated_parquet":  # both magic markers kept, the middle cut away
        data = good.read_bytes()
        cfg = DatasetConfig(path=str(tmp_path / "cut.parquet"))
        Path(cfg.path).write_bytes(data[: len(data) // 2] + data[-2000:])
    else:
        cfg = DatasetConfig(path=str(good), format="jsonl")
    with pytest.raises(ValueError, match=match):
        load_examples(cfg)


def _data_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"task": "jsonl", "train_path": str(path), "reward": "arith", "test_size": 2, **kw})


@pytest.mark.parametrize("content,extra,match", [
    (b"", {}, r"empty\.jsonl has no usable rows \(.*kept 0/0 rows"),
    (b"not json\n[1]\n", {}, r"empty\.jsonl has no usable rows \(.*bad_record=2 \(lines 1, 2\)"),
    (GOOD + b"\n" + GOOD + b"\n", {}, r"has 2 usable rows, not enough to hold out data\.test_size=2"),
    (GOOD + b"\n", {"task": "parquet"}, r"empty\.jsonl: not a readable parquet file .*looks like JSON lines"),
    (GOOD + b"\n", {"prompt_field": "problem"}, r"no usable rows \(.*missing_prompt=1 .*data\.prompt_field='problem'"),
    (GOOD + b"\n", {"reward": "code"}, r"no usable rows \(.*bad_answer=1 .*data\.reward='code'"),
    (GOOD + b"\n", {"chat_template": "always"}, r"data\.chat_template=always, but the model's tokenizer has no chat"),
])
def test_unusable_training_file_names_it(tmp_path, content, extra, match):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_task(_data_cfg(path, **extra), build_arith_tokenizer(), max_context=64)


@pytest.mark.parametrize("key", ["train_path", "test_path"])
def test_missing_data_file_is_named_before_the_model_loads(tmp_path, key):
    from dash.rl.trainer import check_before_loading
    from dash.runtime import resolve_model_path

    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD + b"\n")
    cfg = _data_cfg(path, **{key: str(tmp_path / "nope.jsonl")})
    full = DashConfig(data=cfg)
    with pytest.raises(ConfigError, match=rf"data\.{key}: no such file .*nope\.jsonl"):
        check_before_loading(full, resolve_model_path("builtin:tiny-sft"))


# ---------------------------------------------------------------- rows against the model's context and the KV pool


def _rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    rows = [_row(prompt="1+2", answer="3")] * 4 + [_row(prompt=TOO_LONG, answer="11")]
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


@pytest.mark.parametrize("sampling,context,why", [
    (None, 16, r"over 15 tokens = the model's context \(16\) - 1"),
    (SamplingConfig(num_pages=2, page_size=8, max_new_tokens=6), 64,
     r"over 10 tokens = the KV pool \(sampling\.num_pages=2 x sampling\.page_size=8 = 16 tokens\) - "
     r"sampling\.max_new_tokens=6"),
])
def test_row_too_long_for_the_context_or_pool_is_skipped_and_counted(tmp_path, capsys, sampling, context, why):
    train, test = load_task(_data_cfg(_rows_file(tmp_path)), build_arith_tokenizer(), context, sampling)
    assert len(train.examples) + len(test) == 4  # the 21-token row is out, the 3-token ones stay
    err = capsys.readouterr().err
    assert "prompt_too_long=1 (lines 5)" in err and "kept 4/5" in err
    assert re.search(why, err), err


def test_row_too_long_for_the_pool_in_strict_mode_names_line_and_limit(tmp_path):
    sampling = SamplingConfig(num_pages=2, page_size=8, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"train\.jsonl: line 5: prompt_too_long: '21 tokens > 10'"):
        load_task(_data_cfg(_rows_file(tmp_path), strict=True), build_arith_tokenizer(), 64, sampling)


def test_a_pool_as_large_as_the_context_limits_nothing_more():
    data = DataConfig()
    assert prompt_token_limit(data, SamplingConfig(num_pages=4, page_size=16, max_new_tokens=40), 64)[0] == 63
    assert prompt_token_limit(data, None, None) == (0, "")


@pytest.mark.parametrize("task", ["jsonl", "arith"])
def test_a_pool_without_room_for_a_prompt_is_a_config_error(tmp_path, task):
    sampling = SamplingConfig(num_pages=1, page_size=8, max_new_tokens=8)
    data = _data_cfg(_rows_file(tmp_path)) if task == "jsonl" else DataConfig(test_size=4)
    with pytest.raises(ConfigError, match=r"sampling\.num_pages=1 x sampling\.page_size=8 = 8 tokens\) - "
                                          r"sampling\.max_new_tokens=8 leaves no room for a prompt"):
        load_task(data, build_arith_tokenizer(), 64, sampling)


def test_builtin_task_prompts_over_the_pool_limit_are_a_config_error():
    sampling = SamplingConfig(num_pages=1, page_size=8, max_new_tokens=4)  # room for 4 prompt tokens
    with pytest.raises(ConfigError, match=r"built-in task's prompts have 9 tokens, over the limit of 4 = the KV pool"):
        load_task(DataConfig(test_size=4), build_arith_tokenizer(), 64, sampling)


@pytest.mark.parametrize("form,digits,test_size", [("a*b", 1, 20), ("a+b", 2, 500), ("a+b*c", 2, 999_000)])
def test_builtin_task_with_too_few_problems_names_the_keys(form, digits, test_size):
    """The built-in task holds out test_size problems and trains on 100,000 others: a smaller space cannot split."""
    data = DataConfig(arith_form=form, arith_digits=digits, test_size=test_size)
    with pytest.raises(ConfigError, match=rf"data\.arith_form='{re.escape(form)}', data\.arith_digits={digits}, "
                                          rf"data\.test_size={test_size}: .* exceeds the \d+ distinct problems"):
        load_task(data, build_arith_tokenizer(), 64)
