"""Imports run downhill: no two packages of lorakit, and no two modules, import each other.

The check reads every module of `src/lorakit` with `ast` (no code is run) and collects the lorakit
imports it makes: at module level, inside functions (lazy imports) and under `TYPE_CHECKING`, since
each is a dependency the reader has to follow. Units are modules (`lorakit.merge.run`) and packages:
the first name below `lorakit` (`merge`; a top-level module such as `lorakit.errors` is its own unit).
A cycle is reported by naming its members in order, e.g. `merge -> export -> merge`.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lorakit"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The lorakit modules `path` imports anywhere in its body (module or function level)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import lorakit.a.b` where b is not a module
                target = target.rpartition(".")[0]
            if target.startswith("lorakit") and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module name -> the lorakit modules it imports."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imports_of(p, root, modules) for p in files}


def unit_of(module: str) -> str:
    """The package a module belongs to: `lorakit.merge.run` -> `merge`, `lorakit.errors` -> `errors`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        src = unit_of(module)
        packages.setdefault(src, set()).update(unit_of(t) for t in targets if unit_of(t) != src)
    return packages


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one member (Tarjan), as a path
    `[a, b, ..., a]` through that component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_path(graph, c) for c in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first member back to itself, inside the component."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a cycle")  # unreachable for a strongly connected component


def cycle_report(root: Path = ROOT) -> list[str]:
    graph = import_graph(root)
    return ([f"package cycle: {' -> '.join(c)}" for c in find_cycles(package_graph(graph))]
            + [f"module cycle: {' -> '.join(c)}" for c in find_cycles(graph)])


def test_no_import_cycles() -> None:
    report = cycle_report()
    assert not report, "imports must run downhill:\n" + "\n".join(report)


def test_graph_sees_lazy_and_module_level_imports() -> None:
    graph = import_graph()
    assert "lorakit.errors" in graph["lorakit.cli"]  # module level
    assert "lorakit.export.gguf_writer" in graph["lorakit.export.run"]  # inside a function only


def test_planted_cycle_is_caught(tmp_path: Path) -> None:
    """A scratch copy of the tree with one lazy import added back from a lower package to a higher one."""
    copy = tmp_path / "lorakit"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert cycle_report(copy) == []
    errors = copy / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _planted():\n    from lorakit.cli import main\n")
    report = cycle_report(copy)
    assert "package cycle: cli -> errors -> cli" in report
    assert "module cycle: lorakit.cli -> lorakit.errors -> lorakit.cli" in report


MAX_LINES = 300


def test_files_stay_short_unless_their_docstring_says_why() -> None:
    """A module over MAX_LINES lines must say in its docstring why it is "one piece"."""
    long = [f"{p.relative_to(ROOT.parent)}: {n} lines" for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES
            and "one piece" not in (ast.get_docstring(ast.parse(p.read_text())) or "")]
    assert not long, "split these files (or say in the docstring why each is one piece):\n" + "\n".join(long)
