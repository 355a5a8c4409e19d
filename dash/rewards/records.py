"""Decode what the code sandbox sent back (program values of exact builtin types) and decide each check with it.

Purpose: every byte on the result channel may have been written by the program itself (it shares the harness's
interpreter), so nothing here trusts a record beyond its shape: `decode_records` takes JSON lines, keeps the first
value per (test, slot), and `decode_value` rebuilds only None, bool, int, float, complex, str, bytes, list, tuple,
set, frozenset and dict (the tags written by `dash/rewards/_harness.py:encode`), with bounded nesting; no pickle,
no eval, no class the program chose. A malformed or oversized value is simply missing, so its check fails.
`check_passes` then applies the check's operator to builtin values only, with the expected values of the plan.
Departures from the paper: none (the paper has no sandbox). Run the tests: `python -m pytest tests/rewards -q`.
"""

from __future__ import annotations

import json
import math

from dash.rewards.verdict import _COMPARE_OPS, Check

MAX_DEPTH = 32  # nesting of a returned value; deeper is a failure (also bounds the decoder's recursion)
_SEQUENCES = {"l": list, "t": tuple, "s": set, "z": frozenset}


def decode_value(data: object, depth: int = 0) -> object:
    """The value of one encoded program value (see `_harness.encode`); raises ValueError when malformed."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if data is None or type(data) in (bool, str):
        return data
    if type(data) is not dict or len(data) != 1:
        raise ValueError(f"malformed value {data!r:.60}")
    ((tag, body),) = data.items()
    if tag == "i" and type(body) is str:
        return int(body)
    if tag == "f" and type(body) is str:
        return float(body)
    if tag == "y" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(b) is str for b in body):
        return complex(float(body[0]), float(body[1]))
    if type(body) is not list:
        raise ValueError(f"malformed value {data!r:.60}")
    if tag == "d":
        if not all(type(kv) is list and len(kv) == 2 for kv in body):
            raise ValueError("malformed dict")
        return {decode_value(k, depth + 1): decode_value(v, depth + 1) for k, v in body}
    if tag not in _SEQUENCES:
        raise ValueError(f"unknown value tag {tag!r:.20}")
    return _SEQUENCES[tag](decode_value(item, depth + 1) for item in body)


def decode_records(lines: list[bytes]) -> tuple[dict[tuple[int, int], object], set[int], bool]:
    """Program values {(test, slot): value}, tests that ran to the end, and whether the harness got ready.

    Every record may have been written by the program itself; nothing here trusts it beyond its shape. The first
    record for a (test, slot) counts; malformed records are ignored.
    """
    values: dict[tuple[int, int], object] = {}
    finished: set[int] = set()
    ready = False
    for line in lines:
        try:
            rec = json.loads(line)
            if type(rec) is not dict:
                continue
            ready = ready or rec.get("ready") == 1
            test = rec.get("t")
            if type(test) is not int:
                continue
            if rec.get("ok") == 1:
                finished.add(test)
            elif type(rec.get("k")) is int and "v" in rec and (test, rec["k"]) not in values:
                values[(test, rec["k"])] = decode_value(rec["v"])
        except (ValueError, TypeError, RecursionError, OverflowError):
            continue  # bad JSON, an unhashable set element, a too-long int: that value is missing, so it fails
    return values, finished, ready


def check_passes(check: Check, values: dict[int, object]) -> bool:
    """Decide one check from the decoded program values (slot -> value); a missing value fails."""
    if any(o.slot is not None and o.slot not in values for o in check.operands):
        return False
    args = [values[o.slot] if o.slot is not None else o.value for o in check.operands]
    try:
        if check.kind == "truthy":
            return bool(args[0])
        if check.kind == "falsy":
            return not args[0]
        if check.kind == "isclose":
            return all(type(a) in (int, float, bool) for a in args) and math.isclose(*args, **dict(check.options))
        return all(bool(_COMPARE_OPS[type(op)](a, b)) for op, a, b in zip(check.ops, args, args[1:]))
    except (TypeError, ValueError, OverflowError, RecursionError):
        return False  # e.g. 1 < "a": the original test would have raised
