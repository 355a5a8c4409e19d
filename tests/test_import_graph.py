"""The import graph stays readable: no cycles between dash's packages, no kernel heuristic in the engine's scheduler,
and a function-local import only with its reason beside it.

Nodes are dash's subpackages (dash.rl, dash.engine, ...) and top-level modules (dash.config, dash.data, ...), plus
dash_kernels as one node (a library below dash; its own layout is its business, but it never imports dash). Every
import counts, module-level or inside a function: a lazy import is still a dependency, and hiding a cycle in a
function is what this test is for. Only `if TYPE_CHECKING:` imports are left out (they never run).
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dash", "dash_kernels")
# Engine modules that decide what to run, not how: they take kernel-specific choices from the runner.
POLICY_MODULES = ("dash.engine.scheduler",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_sources() -> dict[str, tuple[str, str]]:
    """module name -> (file path, source) for every module of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[_module_name(path)] = (str(path.relative_to(ROOT)), path.read_text())
    return out


def node_of(module: str) -> str:
    """dash.rl.step -> dash.rl; dash.config -> dash.config; dash_kernels.ops.x -> dash_kernels."""
    parts = module.split(".")
    return "dash_kernels" if parts[0] == "dash_kernels" else ".".join(parts[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


class _Imports(ast.NodeVisitor):
    """Collects (target module, line, inside a function) for each import of one module."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth, self.found = 0, []

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name, node, self.depth > 0))

    def visit_ImportFrom(self, node):
        if node.level:  # relative: resolve against this module's package
            base = self.module.split(".")
            base = base[: len(base) - node.level + (1 if self.is_package else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:  # `from dash import model_io` imports the module dash.model_io
            self.found.append((f"{target}.{alias.name}", node, self.depth > 0, target))


def _imports_of(module: str, path: str, source: str, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(target module, import statement, function-local); `from a import b` targets a.b when that is a module."""
    visitor = _Imports(module, path.endswith("__init__.py"))
    visitor.visit(ast.parse(source, filename=path))
    out = []
    for target, node, local, *parent in visitor.found:
        out.append((target if not parent or target in known else parent[0], node, local))
    return out


def collect(sources: dict[str, tuple[str, str]]) -> list[tuple[str, str, str, int, bool]]:
    """(importing module, its file, target module, line, function-local) for every import in `sources`."""
    rows = []
    for module, (path, source) in sources.items():
        rows += [(module, path, target, node.lineno, local)
                 for target, node, local in _imports_of(module, path, source, set(sources))]
    return rows


def package_cycles(imports) -> list[list[str]]:
    """Each cycle of the node graph (a strongly connected component of more than one node), as 'a -> b (file:line)'
    edges, so the failure says which import to move."""
    edges: dict[str, dict[str, str]] = {}
    for module, path, target, line, _ in imports:
        if target.split(".")[0] not in PACKAGES:
            continue
        a, b = node_of(module), node_of(target)
        if a != b:
            edges.setdefault(a, {}).setdefault(b, f"{path}:{line}")
    # Tarjan's strongly connected components
    index, low, stack, on_stack, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(set(edges) | {b for targets in edges.values() for b in targets}):
        if v not in index:
            visit(v)
    return [[f"{a} -> {b} ({where})" for a in scc for b, where in sorted(edges.get(a, {}).items()) if b in scc]
            for scc in sccs]


def _comment_lines(source: str) -> set[int]:
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            lines.add(tok.start[0])
    return lines


def unexplained_local_imports(sources: dict[str, tuple[str, str]]) -> list[str]:
    """'file:line: import' for each function-local import with no comment on its own line(s) or above its import block."""
    out = []
    for module, (path, source) in sources.items():
        comments = _comment_lines(source)
        import_lines = {line for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
                        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
        for _, node, local in _imports_of(module, path, source, set(sources)):
            above = node.lineno - 1
            while above in import_lines or (above > 0 and not source.splitlines()[above - 1].strip()):
                above -= 1  # one reason above a block of imports (blank lines inside it allowed) covers the block
            span = set(range(node.lineno, (node.end_lineno or node.lineno) + 1)) | {above}
            if local and not span & comments:
                out.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(out))


@pytest.fixture(scope="module")
def sources():
    return read_sources()


def test_no_import_cycle_between_packages(sources):
    cycles = package_cycles(collect(sources))
    assert not cycles, "import cycles between packages (move the shared piece to the lower one):\n" + "\n".join(
        "  " + "; ".join(cycle) for cycle in cycles)


def test_dash_kernels_never_imports_dash(sources):
    upward = [f"{path}:{line}: {target}" for module, path, target, line, _ in collect(sources)
              if node_of(module) == "dash_kernels" and target.split(".")[0] == "dash"]
    assert not upward, "dash_kernels is the library below dash; it imports dash here:\n" + "\n".join(upward)


def test_engine_policy_imports_no_kernel_module(sources):
    found = [f"{path}:{line}: {target}" for module, path, target, line, _ in collect(sources)
             if module in POLICY_MODULES and target.split(".")[0] == "dash_kernels"]
    assert not found, "the scheduler takes kernel-specific choices from the runner, not from dash_kernels:\n" + \
        "\n".join(found)


def test_every_function_local_import_gives_its_reason(sources):
    bad = unexplained_local_imports(sources)
    assert not bad, ("function-local imports without a reason (a comment on the same or previous line; only an "
                     "optional dependency justifies one, else import at the top):\n" + "\n".join(bad))


def test_the_checks_catch_what_they_look_for():
    """The checkers on made-up modules: a cycle through a lazy import, an uncommented local import, a commented one."""
    fake = {
        "dash.rl.a": ("dash/rl/a.py", "from dash.tasks.b import x\n"),
        "dash.tasks.b": ("dash/tasks/b.py", "def f():\n    from dash.rl import a\n"),
        "dash.config": ("dash/config.py", "def g():\n    # optional dependency\n    import wandb\n"
                                          "def h():\n    import yaml\n"
                                          "def k():\n    # one reason above a block\n    import json\n\n"
                                          "    import csv\n"),
        "dash.data": ("dash/data.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from dash.rl.a import y\n"),
        "dash.rl": ("dash/rl/__init__.py", "from .a import x  # relative: dash.rl.a\n"),
        "dash.engine": ("dash/engine/__init__.py", "from dash import config\n"),
    }
    imports = collect(fake)
    assert ("dash.engine", "dash/engine/__init__.py", "dash.config", 1, False) in imports  # a module, by name
    assert package_cycles(imports) == [["dash.rl -> dash.tasks (dash/rl/a.py:1)",
                                        "dash.tasks -> dash.rl (dash/tasks/b.py:2)"]]
    assert unexplained_local_imports(fake) == ["dash/config.py:5: import yaml", "dash/tasks/b.py:2: from dash.rl "
                                                                                "import a"]
    assert ("dash.rl.a", "dash/rl/__init__.py", "dash.rl.a", 1, False) not in imports  # relative import resolved:
    assert ("dash.rl", "dash/rl/__init__.py", "dash.rl.a", 1, False) in imports
    assert not any(module == "dash.data" and target.startswith("dash.rl") for module, _, target, _, _ in imports)
