"""Scratchpad task: deterministic disjoint splits, the demonstrator's route mix, length budgets, and the reward rule."""

import math
import re

import pytest

from dash.tasks.scratchpad import (
    ScratchpadTaskConfig,
    chain_solution,
    direct_solution,
    make_problem,
    make_scratchpad_splits,
    scratchpad_reward,
    uses_scratchpad,
)
from dash.tokenizer import EOS_TOKEN, build_arith_tokenizer

SMALL = {"train_size": 2000, "test_size": 200}
# The route-share test: N draws of Bernoulli(chain_fraction); its share has standard error sqrt(p(1-p)/N), about
# 0.0028 at p=0.2 and N=20000. A 4-SE band: a correct demonstrator fails it with probability 6e-5 for a fresh seed (the
# seeds here are fixed, so the outcome is in fact deterministic), while a share off by 0.02 or more fails it.
ROUTE_N = 20_000
ROUTE_SE_BAND = 4.0


def _operands(prompt: str) -> tuple[int, ...]:
    assert prompt.endswith("=")
    return tuple(int(x) for x in prompt[:-1].split("+"))


def test_splits_are_deterministic_and_seed_dependent():
    a = make_scratchpad_splits(ScratchpadTaskConfig(seed=3, **SMALL))
    b = make_scratchpad_splits(ScratchpadTaskConfig(seed=3, **SMALL))
    c = make_scratchpad_splits(ScratchpadTaskConfig(seed=4, **SMALL))
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


@pytest.mark.parametrize("kw", [{}, {"min_terms": 2, "max_terms": 2, "digits": 1, "train_size": 300, "test_size": 60}])
def test_splits_are_disjoint_and_sized(kw):
    cfg = ScratchpadTaskConfig(**{**SMALL, **kw})
    train, test = make_scratchpad_splits(cfg)
    assert len(train) == cfg.train_size and len(test) == cfg.test_size
    test_prompts = {e.prompt for e in test}
    assert len(test_prompts) == len(test)  # no repeated held-out problem
    assert not test_prompts & {e.prompt for e in train}


def test_test_split_does_not_depend_on_train_size_or_route_mix():
    _, t1 = make_scratchpad_splits(ScratchpadTaskConfig(train_size=10, test_size=50))
    _, t2 = make_scratchpad_splits(ScratchpadTaskConfig(train_size=3000, test_size=50, chain_fraction=0.9))
    assert t1 == t2


def test_route_mix_does_not_change_the_training_problems():
    """chain_fraction picks routes from its own stream: the same problems, only their traces differ."""
    a, _ = make_scratchpad_splits(ScratchpadTaskConfig(chain_fraction=0.0, **SMALL))
    b, _ = make_scratchpad_splits(ScratchpadTaskConfig(chain_fraction=1.0, **SMALL))
    assert [e.prompt for e in a] == [e.prompt for e in b]
    assert all(not uses_scratchpad(e.solution) for e in a) and all(uses_scratchpad(e.solution) for e in b)


@pytest.mark.parametrize("min_terms,max_terms,digits", [(3, 5, 2), (2, 4, 1), (4, 4, 3)])
def test_prompts_have_the_configured_shape(min_terms, max_terms, digits):
    cfg = ScratchpadTaskConfig(min_terms=min_terms, max_terms=max_terms, digits=digits, **SMALL)
    train, test = make_scratchpad_splits(cfg)
    counts = set()
    for e in train + test:
        assert re.fullmatch(rf"(?:[0-9]{{{digits}}}\+)+[0-9]{{{digits}}}=", e.prompt), e.prompt
        ops = _operands(e.prompt)
        assert min_terms <= len(ops) <= max_terms
        assert e.answer == str(sum(ops))
        counts.add(len(ops))
    assert counts == set(range(min_terms, max_terms + 1))  # every count occurs (each 1/3+ of 2200 draws)


def test_every_training_trace_is_correct_and_its_scratchpad_true():
    cfg = ScratchpadTaskConfig(chain_fraction=0.5, **SMALL)
    train, test = make_scratchpad_splits(cfg)
    chains = 0
    for e in train:
        assert scratchpad_reward(e.solution, e.answer) == 1.0, e
        assert e.solution.endswith(EOS_TOKEN) and e.solution.count(EOS_TOKEN) == 1
        head = e.solution[: -len(EOS_TOKEN)]
        ops = _operands(e.prompt)
        if not uses_scratchpad(e.solution):
            assert head == e.answer
            continue
        chains += 1
        # "a+b" first, then "+operand=running sum" per further operand, the last running sum being the answer
        steps = re.fullmatch(r"([0-9]+)((?:\+[0-9]+=[0-9]+)+)", head)
        assert steps, head
        total = int(steps.group(1))
        assert total == ops[0] + ops[1]
        pairs = re.findall(r"\+([0-9]+)=([0-9]+)", steps.group(2))
        assert len(pairs) == len(ops) - 2
        for (operand, running), expected in zip(pairs, ops[2:]):
            assert operand == f"{expected:0{cfg.digits}d}"  # written as in the prompt
            total += expected
            assert running == str(total)  # canonical, no leading zeros
        assert str(total) == e.answer
    assert chains > 0
    assert all(e.solution == e.answer + EOS_TOKEN for e in test)  # held-out rows carry the direct trace


@pytest.mark.parametrize("fraction,seed", [(0.2, 0), (0.5, 7)])
def test_demonstrator_route_share_matches_chain_fraction(fraction, seed):
    train, _ = make_scratchpad_splits(ScratchpadTaskConfig(chain_fraction=fraction, seed=seed, train_size=ROUTE_N,
                                                           test_size=10))
    share = sum(uses_scratchpad(e.solution) for e in train) / len(train)
    band = ROUTE_SE_BAND * math.sqrt(fraction * (1 - fraction) / ROUTE_N)
    assert abs(share - fraction) <= band, f"chain share {share:.4f} vs {fraction} (band +-{band:.4f})"


def test_route_share_extremes_are_exact():
    for fraction, expected in ((0.0, 0), (1.0, SMALL["train_size"])):
        train, _ = make_scratchpad_splits(ScratchpadTaskConfig(chain_fraction=fraction, **SMALL))
        assert sum(uses_scratchpad(e.solution) for e in train) == expected


def test_lengths_fit_the_budgets_in_tokens():
    tok = build_arith_tokenizer()
    cfg = ScratchpadTaskConfig(chain_fraction=1.0, **SMALL)
    train, test = make_scratchpad_splits(cfg)
    prompt_lens = [len(tok.encode(e.prompt)) for e in train + test]
    assert max(prompt_lens) == cfg.max_prompt_len == 15  # "aa+bb+cc+dd+ee="
    for e in train:
        ids = tok.encode(e.solution)
        assert len(ids) <= cfg.max_new_tokens == 25, e.solution
        assert ids[-1] == tok.eos_token_id and tok.decode(ids) == e.solution  # EOS is one token, nothing lost


@pytest.mark.parametrize("min_terms,max_terms,digits", [(3, 5, 2), (2, 2, 1), (2, 8, 3), (5, 5, 1)])
def test_the_longest_scratchpad_exactly_fills_max_new_tokens(min_terms, max_terms, digits):
    """The largest operands give the widest running sums: the budget is tight, not merely an upper bound."""
    tok = build_arith_tokenizer()
    cfg = ScratchpadTaskConfig(min_terms=min_terms, max_terms=max_terms, digits=digits, train_size=0, test_size=1)
    worst = make_problem(cfg, (10**digits - 1,) * max_terms, chain=True)
    assert len(tok.encode(worst.prompt)) == cfg.max_prompt_len
    assert len(tok.encode(worst.solution)) == cfg.max_new_tokens
    assert scratchpad_reward(worst.solution, worst.answer) == 1.0


def test_solution_writers():
    assert direct_solution((7, 42, 13, 88)) == "150<eos>"
    assert chain_solution((7, 42, 13, 88), 2) == "49+13=62+88=150<eos>"
    assert chain_solution((7, 2, 3), 3) == "9+003=12<eos>"
    e = make_problem(ScratchpadTaskConfig(), (7, 42, 13, 88), chain=True)
    assert (e.prompt, e.answer, e.solution) == ("07+42+13+88=", "150", "49+13=62+88=150<eos>")


@pytest.mark.parametrize(
    "completion,answer,expected",
    [
        ("150<eos>", "150", 1.0),  # direct
        ("49+13=62+88=150<eos>", "150", 1.0),  # the scratchpad
        ("150<eos>", 150, 1.0),  # an int answer is accepted
        ("49+13=62+88=150<eos>", 150, 1.0),
        ("150<eos><pad><pad>", "150", 1.0),  # text after the first EOS is ignored
        ("150<eos>+3=153<eos>", "150", 1.0),
        ("0<eos>", "0", 1.0),
        ("49+13=60+88=150<eos>", "150", 1.0),  # a wrong intermediate sum is not checked (documented design limit)
        ("151<eos>", "150", 0.0),  # wrong final number
        ("49+13=62+88=151<eos>", "150", 0.0),
        ("49+13=62+88=150=151<eos>", "150", 0.0),  # the last number counts, not the first correct one
        ("150", "150", 0.0),  # no EOS: truncated
        ("49+13=62+88=150", "150", 0.0),
        ("49+13=62+88=", "150", 0.0),
        ("0150<eos>", "150", 0.0),  # leading zeros are not canonical
        ("49+13=62+88=0150<eos>", "150", 0.0),
        ("00<eos>", "0", 0.0),
        ("150<eos>", "0150", 0.0),  # malformed answer
        ("150+3<eos>", "150", 0.0),  # trailing '+number'
        ("49+13=62+88=150+0<eos>", "150", 0.0),
        ("62+88<eos>", "150", 0.0),  # a sum left unevaluated
        ("=150<eos>", "150", 0.0),
        ("+150<eos>", "150", 0.0),
        (" 150<eos>", "150", 0.0),  # junk characters
        ("150 <eos>", "150", 0.0),
        ("49+13=62+88= 150<eos>", "150", 0.0),
        ("x=150<eos>", "150", 0.0),
        ("49-13=36+88=150<eos>", "150", 0.0),
        ("<bos>150<eos>", "150", 0.0),
        ("150<pad><eos>", "150", 0.0),
        ("-150<eos>", "150", 0.0),
        ("\u0661\u0665\u0660<eos>", "150", 0.0),  # Arabic-Indic digits are not ASCII digits
        ("<eos>", "150", 0.0),
        ("", "150", 0.0),
        ("\x00\xff" * 1000, "150", 0.0),
        (None, "150", 0.0),  # non-str inputs score 0, never raise
        (150, "150", 0.0),
        (b"150<eos>", "150", 0.0),
        (["150<eos>"], "150", 0.0),
        ("150<eos>", None, 0.0),
        ("150<eos>", True, 0.0),
        ("150<eos>", 150.0, 0.0),
        ("150<eos>", "", 0.0),
    ],
)
def test_reward_rule(completion, answer, expected):
    assert scratchpad_reward(completion, answer) == expected


def test_reward_is_fast_on_long_adversarial_text():
    """The completion regex has no nested ambiguity: a long run of digits and separators is matched in linear time."""
    import time

    t0 = time.perf_counter()
    for text in ("1" * 100_000 + "<eos>", "1+" * 50_000 + "<eos>", "1=" * 50_000 + "2<eos>"):
        scratchpad_reward(text, "2")
    assert time.perf_counter() - t0 < 1.0
    assert scratchpad_reward("1=" * 50_000 + "2<eos>", "2") == 1.0


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("150<eos>", False),
        ("49+13=62+88=150<eos>", True),
        ("49+13=62", True),  # a truncated scratchpad is still the scratchpad route
        ("150<eos>1+2=3", False),  # after EOS does not count
        ("", False),
        ("150+3<eos>", False),  # '+' alone is no intermediate sum
    ],
)
def test_uses_scratchpad(completion, expected):
    assert uses_scratchpad(completion) is expected


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"min_terms": 1}, "min_terms"),
        ({"min_terms": 4, "max_terms": 3}, "max_terms"),
        ({"max_terms": 9}, "max_terms"),
        ({"digits": 0}, "digits"),
        ({"digits": 4}, "digits"),
        ({"digits": 2.0}, "digits"),
        ({"min_terms": 3.0}, "min_terms"),
        ({"chain_fraction": -0.1}, "chain_fraction"),
        ({"chain_fraction": 1.5}, "chain_fraction"),
        ({"chain_fraction": float("nan")}, "chain_fraction"),
        ({"train_size": -1}, "train_size"),
        ({"test_size": -1}, "test_size"),
        ({"min_terms": 2, "max_terms": 2, "digits": 1, "test_size": 100}, "test_size"),  # all 100 problems held out
    ],
)
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ScratchpadTaskConfig(**kw)


def test_small_problem_space_still_splits():
    """One problem short of the whole space: the splits finish (the train draw skips held-out problems)."""
    cfg = ScratchpadTaskConfig(min_terms=2, max_terms=2, digits=1, train_size=20, test_size=99)
    train, test = make_scratchpad_splits(cfg)
    assert len({e.prompt for e in test}) == 99 and len({e.prompt for e in train}) == 1


def test_route_stats_counts_each_route():
    from dash.tasks.scratchpad import route_stats

    comps = ["12+3=15<eos>", "15<eos>", "14<eos>", "12+3=16<eos>"]
    stats = route_stats(comps, ["15", "15", "15", "15"])
    assert stats == {"scratchpad_share": 0.5, "acc_scratchpad": 0.5, "acc_at_once": 0.5}
    assert route_stats(["15<eos>"], ["15"]) == {"scratchpad_share": 0.0, "acc_scratchpad": 0.0, "acc_at_once": 1.0}
    with pytest.raises(ValueError, match="route_stats"):
        route_stats([], [])
