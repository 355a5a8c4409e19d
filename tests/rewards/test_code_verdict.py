"""Verdicts kept out of the sandbox: splitting tests, evaluating expected values, the value codec (no subprocess)."""

import ast
import json
from collections import Counter, OrderedDict, namedtuple

import pytest

from dash.rewards._harness import encode
from dash.rewards.records import MAX_DEPTH, check_passes, decode_records, decode_value
from dash.rewards.verdict import Check, Operand, _NotExpected, expected_value, plan_test


def _expected(source: str):
    return expected_value(ast.parse(source, mode="eval").body)


def test_expected_values_are_literals_and_pure_builtins():
    assert _expected("[1, (2, 'a'), {3}, {'k': None}, b'x', -1.5, 1+2j, not True]") == [
        1, (2, "a"), {3}, {"k": None}, b"x", -1.5, 1 + 2j, False]  # fmt: skip
    assert _expected("sorted(set([3, 1, 2]), reverse=True)") == [3, 2, 1]
    assert _expected("float('inf')") == float("inf") and _expected("round(3.14159, 2)") == 3.14
    refused = ("f(1)", "x", "__import__('os').getpid()", "open('/etc/passwd')", "'a' * 10**9", "10**10**10", "[*x]",
               "dict(**x)", "int('x')", "math.pi", "(lambda: 1)()", "len([1])")  # fmt: skip
    for not_expected in refused:
        with pytest.raises(_NotExpected):
            _expected(not_expected)


def test_plan_keeps_expected_values_out_of_the_sandbox():
    plan = plan_test("assert add(1, 2) == 3")
    assert plan.steps == (("eval", "add(1, 2)"),) and not plan.opaque
    assert plan.checks[0].operands == (Operand(slot=0), Operand(value=3))
    # Expected on the left, `in`, chained comparisons, isclose, `not`, `and`, `is None`, steps before checks.
    plan = plan_test("import math\nx = f()\nassert [1, 2] == x and 3 in g()\nassert 0 < h() <= 5\n"
                     "assert math.isclose(k(), 0.5, rel_tol=1e-3)\nassert not m()\nassert n() is None")  # fmt: skip
    assert [s for s in plan.steps] == [("exec", "import math"), ("exec", "x = f()"), ("eval", "x"), ("eval", "g()"),
                                       ("eval", "h()"), ("eval", "k()"), ("eval", "m()"), ("eval", "n()")]  # fmt: skip
    assert [c.kind for c in plan.checks] == ["compare", "compare", "compare", "isclose", "falsy", "compare"]
    assert plan.checks[3].options == (("rel_tol", 1e-3),)
    secret = "EXPECTED-abc"  # nowhere in what the sandbox receives
    assert secret not in repr(plan_test(f"assert f() == {secret!r}").steps)


@pytest.mark.parametrize("source", [
    "check(f)", "pass", "assert f() == g()", "assert all(f(i) == i for i in range(3))", "assert f() is g()",
    "for i in range(3):\n    assert f(i) == i", "def check(c):\n    assert c(1) == 1\ncheck(f)", "assert f(",
    "if f():\n    raise ValueError", "assert f() == 1 if x else 2", "assert math.isclose(f(), g())",
])  # fmt: skip
def test_forms_whose_verdict_would_be_inside_are_opaque(source):
    plan = plan_test(source)
    assert plan.opaque and plan.steps == (("exec", source),) and plan.checks == ()


def test_check_passes_decides_with_builtin_semantics():
    eq3 = Check("compare", (Operand(slot=0), Operand(value=3)), (ast.Eq(),))
    assert check_passes(eq3, {0: 3}) and check_passes(eq3, {0: 3.0}) and check_passes(eq3, {0: True}) is False
    assert not check_passes(eq3, {}) and not check_passes(eq3, {0: "3"})  # a missing value fails
    lt = Check("compare", (Operand(slot=0), Operand(value="a")), (ast.Lt(),))
    assert not check_passes(lt, {0: 1})  # 1 < "a" raises in Python: a failure, not a crash
    close = Check("isclose", (Operand(slot=0), Operand(value=0.5)), options=(("rel_tol", 1e-3),))
    assert check_passes(close, {0: 0.5004}) and not check_passes(close, {0: 0.51}) and not check_passes(close, {0: "x"})
    assert check_passes(Check("truthy", (Operand(slot=0),)), {0: [0]})
    assert check_passes(Check("falsy", (Operand(slot=0),)), {0: ()})


def test_codec_round_trips_exact_builtin_values():
    value = [None, True, 2**100, -0.0, float("inf"), "\ud800x", b"\x00", 1j, (1, [2]), {3}, frozenset({4}),
             {(1, 2): {"a": [None]}}]  # fmt: skip
    back = decode_value(json.loads(json.dumps(encode(value))))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    nan = decode_value(encode(float("nan")))
    assert nan != nan  # NaN equals nothing, so it passes no == check


def test_codec_reduces_builtin_subclasses_to_their_data_and_refuses_others():
    class AlwaysEqual(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    point = namedtuple("Point", "x y")
    assert decode_value(encode(AlwaysEqual(5))) == 5 and decode_value(encode(AlwaysEqual(5))) != 3
    assert decode_value(encode(Counter("aab"))) == {"a": 2, "b": 1}
    assert type(decode_value(encode(OrderedDict(a=1)))) is dict
    assert decode_value(encode(point(1, 2))) == (1, 2)
    for bad in (object(), type("Any", (), {"__eq__": lambda s, o: True})(), [1, object()], range(3)):
        with pytest.raises(TypeError):
            encode(bad)
    deep = []
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(ValueError):
        encode(deep)


def test_decoder_refuses_malformed_and_forged_shapes():
    for bad in ({"i": 1}, {"x": []}, {"i": "1", "f": "2"}, [1], 1.5, {"s": [{"l": []}]}, {"i": "9" * 5000}):
        with pytest.raises((ValueError, TypeError)):
            decode_value(bad)
    deep = {"l": []}
    for _ in range(MAX_DEPTH + 2):
        deep = {"l": [deep]}
    with pytest.raises(ValueError):
        decode_value(deep)
    lines = [b"garbage", b'{"ready":1}', b'{"t":0,"k":0,"v":{"i":"1"}}', b'{"t":0,"k":0,"v":{"i":"2"}}',
             b'{"t":0,"ok":1}', b'{"t":"0","ok":1}', b'{"t":1,"k":0,"v":{"s":[{"l":[]}]}}']  # fmt: skip
    values, finished, ready = decode_records(lines)
    assert values == {(0, 0): 1} and finished == {0} and ready  # first record wins; an unhashable set is dropped
