"""Verdicts the sandboxed program cannot forge: expected values stay in the trainer, only program values come back.

Purpose: a program that subverts its interpreter (walks frames, patches builtins, reaches ctypes) controls every
byte the sandbox sends back, so a pass mark computed inside could always be forged. Instead each test is split here,
in the trainer, with `ast` (`plan_test`):
- `assert A <op> B [<op> C ...]` (op: == != < <= > >= in, not in; `is` / `is not` only against None/True/False),
  `assert math.isclose(A, B, rel_tol=.., abs_tol=..)`, `assert E`, `assert not E`, and `assert X and Y` (split);
- each operand is either an *expected value* (literals, and calls of a few pure builtins on literals, evaluated
  here by `expected_value`, never by `eval`) or a *program expression* that the sandbox evaluates; a comparison
  needs at least one expected operand, and a program expression must not itself compare (no comparison, and/or or
  if-else inside), so no verdict is computed inside;
- every other statement (import, assignment, call) runs inside as a step, in order.
The sandbox returns each program value encoded with exact builtin types only (`dash/rewards/_harness.py`); the
trainer decodes it and applies the operator with the expected value (`dash/rewards/records.py`). So the expected
values never exist inside, and an object whose `__eq__` is always True cannot pass.

What stays forgeable: `assert E` only asks for a truthy value (the program may guess); constants written inside a
program expression (`abs(f(x) - 3.14) < 1e-6`: the 3.14) are visible to the program. A test with no check of these
forms (e.g. `check(f)` with the asserts in a helper) is *opaque*: its only verdict is "ran without an exception",
which the program can forge. `CodeRewardConfig.opaque_tests="fail"` (default) scores such tests 0 and does not even
send them (their text could hold other tests' expected values); "in_sandbox" runs them and trusts the outcome.

Departures from the paper: none (the paper's MBPP+ checker is not released). Run: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

# Pure builtins an expected value may call, on expected values only: none can run code of the program or the row.
_PURE_CALLS = {f.__name__: f for f in (set, frozenset, tuple, list, sorted, dict, float, int, str, abs, round, bool)}
_LITERAL_TYPES = (int, float, complex, str, bytes, bool, type(None))
_COMPARE_OPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}  # fmt: skip
_SINGLETONS = (None, True, False)  # the only values `is` compares meaningfully after decoding
# Nodes that would put (part of) a verdict inside the sandbox if they appeared in a program expression.
_VERDICT_NODES = (ast.Compare, ast.BoolOp, ast.IfExp)


class _NotExpected(Exception):
    """The node is not an expected value (it depends on the program, or is outside the allow-list)."""


@dataclass(frozen=True, slots=True)
class Operand:
    """One side of a check. Attributes: value: the expected value (trainer side); slot: index of the program value."""

    value: object = None
    slot: int | None = None  # None: `value` is known in the trainer


@dataclass(frozen=True, slots=True)
class Check:
    """One assertion, decided in the trainer. kind: compare | isclose | truthy | falsy."""

    kind: str
    operands: tuple[Operand, ...]
    ops: tuple[ast.cmpop, ...] = ()
    options: tuple[tuple[str, float], ...] = ()  # math.isclose keywords


@dataclass(frozen=True, slots=True)
class TestPlan:
    """How one test runs. steps: ("exec" | "eval", source) run inside in order; checks: decided in the trainer."""

    steps: tuple[tuple[str, str], ...]
    checks: tuple[Check, ...]
    opaque: bool = False


def expected_value(node: ast.expr) -> object:
    """Value of a literal-only expression, or _NotExpected. Calls only the `_PURE_CALLS` builtins, on literals."""
    if isinstance(node, ast.Constant) and type(node.value) in _LITERAL_TYPES:
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and not any(isinstance(e, ast.Starred) for e in node.elts):
        items = [expected_value(e) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {expected_value(k): expected_value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        value = expected_value(node.operand)
        if isinstance(node.op, ast.Not):
            return not value
        if type(value) not in (int, float, complex):
            raise _NotExpected
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # 1+2j, -0.5 - 1: bounded results
        left, right = expected_value(node.left), expected_value(node.right)
        if type(left) not in (int, float, complex) or type(right) not in (int, float, complex):
            raise _NotExpected
        return left + right if isinstance(node.op, ast.Add) else left - right
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _PURE_CALLS:
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise _NotExpected
        args = [expected_value(a) for a in node.args]
        kwargs = {k.arg: expected_value(k.value) for k in node.keywords}
        try:
            return _PURE_CALLS[node.func.id](*args, **kwargs)
        except Exception as exc:  # e.g. int('x'): not an expected value; the sandbox then evaluates (and fails) it
            raise _NotExpected from exc
    raise _NotExpected


class _Planner:
    """Builds a TestPlan from the statements of one test; raises _NotExpected when a statement fits no form."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.checks: list[Check] = []
        self.slots = 0

    def operand(self, node: ast.expr, *, allow_program: bool = True) -> Operand:
        try:
            return Operand(value=expected_value(node))
        except _NotExpected:
            pass
        if not allow_program or any(isinstance(n, _VERDICT_NODES) for n in ast.walk(node)):
            raise _NotExpected
        self.steps.append(("eval", ast.unparse(node)))
        self.slots += 1
        return Operand(slot=self.slots - 1)

    def assertion(self, test: ast.expr) -> None:
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            for value in test.values:
                self.assertion(value)
        elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            self.checks.append(Check("falsy", (self.operand(test.operand),)))
        elif isinstance(test, ast.Compare):
            if any(type(op) not in _COMPARE_OPS for op in test.ops):
                raise _NotExpected
            nodes = [test.left, *test.comparators]
            if any(isinstance(op, (ast.Is, ast.IsNot)) for op in test.ops):
                if len(nodes) != 2 or not any(_is_singleton(n) for n in nodes):
                    raise _NotExpected
            if all(_depends_on_program(n) for n in nodes):
                raise _NotExpected  # nothing hidden from the program: it could make both sides agree
            self.checks.append(Check("compare", tuple(self.operand(n) for n in nodes), tuple(test.ops)))
        elif _is_isclose(test):
            options = tuple((k.arg, self.operand(k.value, allow_program=False).value) for k in test.keywords)
            operands = tuple(self.operand(a) for a in test.args)
            if all(o.slot is not None for o in operands):
                raise _NotExpected
            self.checks.append(Check("isclose", operands, options=options))
        else:
            self.checks.append(Check("truthy", (self.operand(test),)))

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assert):
            self.assertion(stmt.test)
        elif any(isinstance(n, (ast.Assert, ast.Raise)) for n in ast.walk(stmt)):
            raise _NotExpected  # a verdict hidden in a loop, a function or a raise: only the sandbox could decide it
        else:
            self.steps.append(("exec", ast.unparse(stmt)))


def _is_singleton(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and any(node.value is s for s in _SINGLETONS)


def _depends_on_program(node: ast.expr) -> bool:
    try:
        expected_value(node)
    except _NotExpected:
        return True
    return False


def _is_isclose(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else None
    named = isinstance(func, ast.Attribute) and func.attr == "isclose" and isinstance(func.value, ast.Name)
    return (
        named and func.value.id == "math" and len(node.args) == 2
        and all(k.arg in ("rel_tol", "abs_tol") for k in node.keywords)
    )  # fmt: skip


def plan_test(source: str) -> TestPlan:
    """Split one test into steps run inside and checks decided here; an opaque plan runs the source as one step."""
    opaque = TestPlan(steps=(("exec", source),), checks=(), opaque=True)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return opaque  # runs inside, raises there, and fails like the original would
    planner = _Planner()
    try:
        for stmt in tree.body:
            planner.statement(stmt)
    except (_NotExpected, RecursionError):
        return opaque
    if not planner.checks:
        return opaque  # no assertion at all (`check(f)`, `pass`): only "no exception", which the program controls
    return TestPlan(steps=tuple(planner.steps), checks=tuple(planner.checks))
