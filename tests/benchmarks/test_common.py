"""benchmarks/common.py: every JSON line carries the same metadata keys, and scripts share code only through modules
meant for it (a script importing another script's private helper broke when that script changed)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402


def test_result_puts_bench_first_and_every_common_key_last():
    record = common.result("linear", "cpu", rows=[1, 2])
    assert list(record)[:2] == ["bench", "rows"] and record["bench"] == "linear"
    assert set(common.COMMON_KEYS) <= set(record)
    assert record["device"] == "cpu" and record["gpu"] is None and record["cores"] >= 1
    assert record["timestamp"].endswith("Z") and record["git_sha"]


def test_result_refuses_a_field_named_like_a_common_key():
    with pytest.raises(ValueError, match=r"fields \['cpu', 'torch'\] are common keys"):
        common.result("linear", "cpu", torch="2.0", cpu="x")


def test_emit_prints_the_table_then_one_json_line_and_writes_both_files(tmp_path, capsys):
    record = common.result("linear", "cpu", speedup=2.5)
    common.emit("| a | b |", record, tmp_path / "sub" / "lin", heading="# head\n\n")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| a | b |" and json.loads(lines[-1]) == record
    assert json.loads((tmp_path / "sub" / "lin.json").read_text()) == record
    md = (tmp_path / "sub" / "lin.md").read_text()
    assert md.startswith("# head\n\n| a | b |") and json.dumps(record) in md


def _sibling_imports(path: Path, scripts: set[str]) -> list[tuple[str, str]]:
    """(module, name) of every `from <sibling script> import name` in one benchmark file."""
    tree = ast.parse(path.read_text())
    return [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.module in scripts for alias in node.names]


def test_no_benchmark_imports_a_private_name_of_another():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")}
    private = {p.name: [f"{m}.{n}" for m, n in _sibling_imports(p, scripts) if n.startswith("_")]
               for p in BENCHMARKS.glob("*.py")}
    assert not {k: v for k, v in private.items() if v}, "move these into benchmarks/common.py"
    assert not [p.name for p in BENCHMARKS.glob("*.py") if "def _git_sha" in p.read_text()]
