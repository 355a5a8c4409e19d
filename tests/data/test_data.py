"""dash.data: loading jsonl/parquet rows with bad-row accounting, templates, and the resumable prompt iterator."""

import json
import sys
from pathlib import Path

import pytest

from dash.data import DatasetConfig, Example, PromptIterator, load_examples, read_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
MATH = str(FIXTURES / "math_tiny.jsonl")
GSM8K = str(FIXTURES / "gsm8k_tiny.jsonl")
MBPP = str(FIXTURES / "mbpp_tiny.jsonl")


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word; optional chat template."""

    def __init__(self, chat_template: str | None = None):
        self.chat_template = chat_template

    def encode(self, text, add_special_tokens=False):
        if "\u2603" in text:
            raise ValueError("cannot encode a snowman")
        return text.split()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        body = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")


def _math_cfg(**kw) -> DatasetConfig:
    base = {"path": MATH, "prompt_field": "problem", "answer_field": "solution", "answer_parser": "math"}
    return DatasetConfig(**{**base, **kw})


def test_math_rows_skipped_and_counted():
    examples, stats = load_examples(_math_cfg(max_prompt_tokens=20), tokenizer=WordTokenizer())
    assert [e.row for e in examples] == [1, 2, 10]
    assert [e.answer for e in examples] == ["\\frac{3}{4}", "4", "4"]
    assert examples[0].prompt == "What is $\\frac{1}{2}+\\frac{1}{4}$?"  # the paper's template: the raw problem
    assert stats.unit == "line" and stats.rows == 10 and stats.kept == 3  # the blank line 7 is not a row
    assert stats.skipped == {
        "missing_prompt": 1, "missing_answer": 1, "empty_prompt": 1, "bad_record": 2, "bad_answer": 1,
        "prompt_too_long": 1,
    }  # fmt: skip
    assert stats.first_rows["bad_record"] == [6, 11] and stats.first_rows["prompt_too_long"] == [9]
    assert "kept 3/10" in stats.summary() and "bad_record=2 (lines 6, 11)" in stats.summary()


def test_strict_raises_naming_row_and_field():
    with pytest.raises(ValueError, match=r"line 3: missing_prompt: 'problem'"):
        load_examples(_math_cfg(strict=True))


def test_template_fields_and_template_errors():
    examples, stats = load_examples(_math_cfg(prompt_template="[{level}] {prompt}\nAnswer in \\boxed{{}}."))
    assert examples[0].prompt == "[Level 1] What is $\\frac{1}{2}+\\frac{1}{4}$?\nAnswer in \\boxed{}."
    assert stats.first_rows["template_error"] == [10]  # line 10 has no "level" field
    for bad in ("{unclosed", "{prompt.no_such_attribute}"):
        with pytest.raises(ValueError, match="prompt_template"):
            DatasetConfig(path=MATH, prompt_template=bad)


def test_chat_template_modes():
    chat = WordTokenizer(chat_template="{{ jinja }}")
    examples, _ = load_examples(_math_cfg(chat_template="auto", system_prompt="Think."), tokenizer=chat)
    assert examples[1].prompt == "<|system|>Think.<|user|>Compute $2+2$.<|assistant|>"
    plain, _ = load_examples(_math_cfg(chat_template="auto"), tokenizer=WordTokenizer())  # none: plain template
    assert plain[1].prompt == "Compute $2+2$."
    never, _ = load_examples(_math_cfg(chat_template="never"), tokenizer=chat)
    assert never[1].prompt == "Compute $2+2$."
    with pytest.raises(ValueError, match="no chat template"):
        load_examples(_math_cfg(chat_template="always"), tokenizer=WordTokenizer())


def test_over_long_needs_a_tokenizer_and_encode_errors_are_skipped(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_examples(_math_cfg(max_prompt_tokens=10))
    path = tmp_path / "snow.jsonl"
    path.write_text(
        json.dumps({"prompt": "a \u2603", "answer": "1"}) + "\n" + json.dumps({"prompt": "a", "answer": "1"})
    )
    examples, stats = load_examples(DatasetConfig(path=str(path), max_prompt_tokens=5), tokenizer=WordTokenizer())
    assert len(examples) == 1 and stats.first_rows["prompt_encode_error"] == [1]


def test_gsm8k_answers_are_parsed():
    cfg = DatasetConfig(path=GSM8K, prompt_field="question", answer_parser="gsm8k")
    examples, stats = load_examples(cfg)
    assert [e.answer for e in examples] == ["72", "1250", "10"]
    assert stats.first_rows == {"bad_answer": [3]}


def test_code_rows_with_several_answer_fields():
    cfg = DatasetConfig(path=MBPP, prompt_field="text", answer_field="test_list,test_imports", answer_parser="code")
    examples, stats = load_examples(cfg)
    assert len(examples) == 2 and stats.first_rows == {"bad_answer": [3]}  # row 3 has an empty test list
    assert json.loads(examples[1].answer) == {"tests": ["assert square(3) == 9"], "setup": "import math"}


def test_read_records_reports_bad_json():
    records = list(read_records(MATH))
    assert [row for row, _ in records] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    assert isinstance(dict(records)[6], ValueError)


def _examples(n: int) -> list[Example]:
    return [Example(prompt=f"p{i}", answer=str(i), row=i) for i in range(n)]


def test_iterator_is_seeded_and_epoch_aware():
    it = PromptIterator(_examples(5), seed=3)
    first_epoch = it.next_batch(5)
    assert sorted(e.row for e in first_epoch) == [0, 1, 2, 3, 4] and it.epoch == 0
    second = it.next_batch(3)
    assert it.epoch == 1 and it.position == 3
    assert [e.row for e in PromptIterator(_examples(5), seed=3).next_batch(8)] == [e.row for e in first_epoch + second]
    assert [e.row for e in PromptIterator(_examples(5), seed=4).next_batch(5)] != [e.row for e in first_epoch]
    assert [e.row for e in PromptIterator(_examples(5), shuffle=False).next_batch(7)] == [0, 1, 2, 3, 4, 0, 1]
    assert len(PromptIterator(_examples(2)).next_batch(7)) == 7  # batches larger than the dataset wrap around


def test_iterator_resume_is_exact():
    straight = PromptIterator(_examples(7), seed=11)
    expected = [[e.row for e in straight.next_batch(3)] for _ in range(6)]
    first = PromptIterator(_examples(7), seed=11)
    got = [[e.row for e in first.next_batch(3)] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptIterator(_examples(7), seed=0)  # the saved seed wins
    resumed.load_state_dict(state)
    got += [[e.row for e in resumed.next_batch(3)] for _ in range(3)]
    assert got == expected


def test_iterator_refuses_other_data():
    state = PromptIterator(_examples(4)).state_dict()
    with pytest.raises(ValueError, match="inexact resume"):
        PromptIterator(_examples(5)).load_state_dict(state)
    changed = _examples(4)
    changed[2] = Example(prompt="edited", answer="2", row=2)
    with pytest.raises(ValueError, match="inexact resume"):
        PromptIterator(changed).load_state_dict(state)
    with pytest.raises(ValueError):
        PromptIterator([])
    with pytest.raises(ValueError):
        PromptIterator(_examples(2)).next_batch(0)


def test_parquet_without_pyarrow_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")  # it must exist: a missing file is an error before any import
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_examples(DatasetConfig(path=str(tmp_path / "x.parquet")))


def test_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip(
        "pyarrow", reason="pyarrow not installed: parquet path untested here (pip install pyarrow; it is on PyPI)"
    )
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in Path(GSM8K).read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k.parquet")
    cfg = DatasetConfig(path=str(tmp_path / "gsm8k.parquet"), prompt_field="question", answer_parser="gsm8k")
    examples, stats = load_examples(cfg)
    from_jsonl, _ = load_examples(DatasetConfig(path=GSM8K, prompt_field="question", answer_parser="gsm8k"))
    assert [(e.prompt, e.answer) for e in examples] == [(e.prompt, e.answer) for e in from_jsonl]
    assert stats.unit == "row" and stats.first_rows == {"bad_answer": [2]}  # 0-based row index


def test_with_a_real_hf_tokenizer(tmp_path):
    """The char tokenizer of the built-in task: real `encode` errors and a real (jinja) chat template."""
    from dash.tokenizer import build_arith_tokenizer

    tok = build_arith_tokenizer()
    rows = [
        {"prompt": "12+34", "answer": 46},
        {"prompt": "12+ab", "answer": 1},
        {"prompt": "1+" * 20 + "1", "answer": 21},
    ]
    path = tmp_path / "arith.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DatasetConfig(path=str(path), prompt_template="{prompt}=", max_prompt_tokens=16, answer_parser="arith")
    examples, stats = load_examples(cfg, tokenizer=tok)
    assert [(e.prompt, e.answer) for e in examples] == [("12+34=", "46")]
    assert stats.first_rows == {"prompt_encode_error": [2], "prompt_too_long": [3]}
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    chat, _ = load_examples(DatasetConfig(path=str(path), chat_template="always", answer_parser="arith"), tokenizer=tok)
    assert chat[0].prompt == "12+34="


def test_a_bad_line_costs_that_line_not_the_file(tmp_path):
    """Invalid UTF-8 and absurdly nested JSON are bad rows (skipped and counted), not errors that end the load."""
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"prompt": "1+1?", "answer": "2"}).encode()
    path.write_bytes(b"\n".join([good, b'{"prompt": "\xff\xfe", "answer": "1"}', b"[" * 200_000, good]) + b"\n")
    records = dict(read_records(path))
    assert isinstance(records[2], ValueError) and "UTF-8" in str(records[2])
    assert isinstance(records[3], ValueError) and "nested" in str(records[3])
    examples, stats = load_examples(DatasetConfig(path=str(path), answer_parser="math"))
    assert len(examples) == 2 and stats.skipped == {"bad_record": 2}


def test_trainer_data_skips_prompts_the_model_cannot_fit(tmp_path):
    """load_task with the model's context: a prompt of context - 1 tokens or more is skipped at load (with
    data.max_prompt_tokens off), where it used to reach the sampler and end the run at the step that drew it."""
    from dash.config import DataConfig
    from dash.rl.task_data import load_task
    from dash.tokenizer import build_arith_tokenizer

    tok = build_arith_tokenizer()
    rows = [{"prompt": "1+2=", "answer": "3"}] * 6 + [{"prompt": "1+" * 40 + "2=", "answer": "42"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(task="jsonl", train_path=str(path), reward="math", test_size=2)
    train, test = load_task(cfg, tok, max_context=32)
    prompts = [e.prompt for e in (*test, *train.examples)]
    assert len(prompts) == 6 and all(len(tok.encode(p, add_special_tokens=False)) < 32 for p in prompts)
    train, test = load_task(cfg, tok)  # no context given: every row kept, as before
    assert len(test) + len(train.examples) == 7
