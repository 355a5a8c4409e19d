"""Arithmetic task: deterministic disjoint splits, the difficulty knobs, and the exact-answer reward rule."""

import pytest

from dash.tasks.arith import FORMS, TINY_MODEL_CONFIG, ArithTaskConfig, arith_reward, make_example, make_splits
from dash.tokenizer import build_arith_tokenizer

SMALL = {"train_size": 2000, "test_size": 200}


def test_splits_are_deterministic_and_seed_dependent():
    a = make_splits(ArithTaskConfig(seed=3, **SMALL))
    b = make_splits(ArithTaskConfig(seed=3, **SMALL))
    c = make_splits(ArithTaskConfig(seed=4, **SMALL))
    assert a == b
    assert a[1] != c[1] and a[0] != c[0]


@pytest.mark.parametrize("form,digits", [("a+b*c", 2), ("a+b", 1), ("a*b", 2)])
def test_splits_are_disjoint_and_unique(form, digits):
    cfg = ArithTaskConfig(form=form, digits=digits, train_size=60 if digits == 1 else 2000, test_size=40)
    train, test = make_splits(cfg)
    assert len(train) == cfg.train_size and len(test) == cfg.test_size
    train_p, test_p = {e.prompt for e in train}, {e.prompt for e in test}
    assert len(train_p) == len(train) and len(test_p) == len(test)
    assert not train_p & test_p


def test_test_split_does_not_depend_on_train_size():
    _, t1 = make_splits(ArithTaskConfig(train_size=100, test_size=50))
    _, t2 = make_splits(ArithTaskConfig(train_size=5000, test_size=50))
    assert t1 == t2


def test_default_task_shape():
    cfg = ArithTaskConfig()
    train, test = make_splits(ArithTaskConfig(**SMALL))
    for e in train[:50] + test:
        assert len(e.prompt) == cfg.prompt_len == 9  # "aa+bb*cc="
        a, b, c = int(e.prompt[0:2]), int(e.prompt[3:5]), int(e.prompt[6:8])
        assert e.answer == str(a + b * c)
        assert e.solution == e.answer + "<eos>"
        assert arith_reward(e.solution, e.answer) == 1.0
    assert cfg.max_answer_len == 4 and cfg.max_new_tokens == 5  # 99 + 99*99 = 9900


def test_difficulty_knobs_change_the_task():
    base = make_splits(ArithTaskConfig(**SMALL))[1]
    wider = make_splits(ArithTaskConfig(digits=3, **SMALL))[1]
    plus = make_splits(ArithTaskConfig(form="a+b", **SMALL))[1]
    assert len(wider[0].prompt) == 12 and len(plus[0].prompt) == 6
    assert {e.prompt for e in base}.isdisjoint({e.prompt for e in wider} | {e.prompt for e in plus})
    assert make_example(ArithTaskConfig(form="a*b+c"), (2, 3, 4)).answer == "10"
    assert make_example(ArithTaskConfig(form="a+b*c"), (2, 3, 4)).answer == "14"
    assert make_example(ArithTaskConfig(form="a+b*c"), (2, 3, 4)).prompt == "02+03*04="


def test_every_form_is_tokenizable():
    tok = build_arith_tokenizer()
    for form in FORMS:
        train, test = make_splits(ArithTaskConfig(form=form, train_size=10, test_size=10))
        for e in train + test:
            assert tok.decode(tok(e.prompt + e.solution)["input_ids"]) == e.prompt + e.solution


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="form"):
        ArithTaskConfig(form="a-b")
    with pytest.raises(ValueError, match="digits"):
        ArithTaskConfig(digits=0)
    with pytest.raises(ValueError, match="exceeds"):
        ArithTaskConfig(form="a+b", digits=1, train_size=90, test_size=20)


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("553<eos>", "553", 1.0),
        ("553<eos><pad><pad>", "553", 1.0),  # everything after the first EOS is ignored
        ("553<eos>12", "553", 1.0),
        ("0<eos>", "0", 1.0),
        ("553<eos>", 553, 1.0),  # an int answer is accepted
        ("553", "553", 0.0),  # no EOS: truncated
        ("5530<eos>", "553", 0.0),
        ("0553<eos>", "553", 0.0),  # leading zeros are not canonical
        ("00<eos>", "0", 0.0),
        ("553+1<eos>", "553", 0.0),  # extra text before EOS
        (" 553<eos>", "553", 0.0),
        ("553 <eos>", "553", 0.0),
        ("<bos>553<eos>", "553", 0.0),
        ("553<pad><eos>", "553", 0.0),
        ("-553<eos>", "553", 0.0),
        ("<eos>", "553", 0.0),
        ("", "553", 0.0),
        ("\u0665\u0665\u0663<eos>", "553", 0.0),  # Arabic-Indic digits are not ASCII digits
        ("553<eos>", "0553", 0.0),  # malformed answer
        ("553<eos>", "", 0.0),
        (None, "553", 0.0),
        (b"553<eos>", "553", 0.0),
        ("553<eos>", None, 0.0),
        ("553<eos>", True, 0.0),
        ("\x00\xff" * 1000, "553", 0.0),
    ],
)
def test_reward_rule(completion, answer, expected):
    assert arith_reward(completion, answer) == expected


def test_tiny_model_config_matches_tokenizer():
    tok = build_arith_tokenizer()
    assert TINY_MODEL_CONFIG["vocab_size"] == len(tok)
    assert TINY_MODEL_CONFIG["pad_token_id"] == tok.pad_token_id
    assert TINY_MODEL_CONFIG["eos_token_id"] == tok.eos_token_id
    assert TINY_MODEL_CONFIG["bos_token_id"] == tok.bos_token_id
