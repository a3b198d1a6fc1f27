"""The package's structure: no import cycle inside ``vlaug/``, and the built-in method list
generated from the registry wherever it is repeated.

The flow reads CLI -> config -> plan -> methods -> run result -> report, each layer
importing only the ones before it. An import anywhere in a module counts: at the top, inside
a function (a lazy import) and under ``if TYPE_CHECKING:`` (an annotation still names the
module it comes from).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vlaug"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for file in root.rglob("*.py"):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (every import statement in its file)."""
    modules = _modules(root)

    def resolve(name: str) -> str:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {resolve(t) for t in targets if t.split(".")[0] == root.name}
        graph[name] = edges - {name, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{v} imports {sorted(graph[v] & set(c))}" for v in c) + ")"
                       for c in found)
    assert not found, f"import cycles in vlaug/: {detail}"


def test_the_cycle_finder_finds_a_cycle_through_a_type_only_and_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import C\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("")
    assert cycles(import_graph(pkg)) == []


@pytest.mark.parametrize("layer, later", [
    ("vlaug.runs", ("vlaug.evaluate", "vlaug.methods", "vlaug.report", "vlaug.cli")),
    ("vlaug.methods.base", ("vlaug.evaluate", "vlaug.report", "vlaug.cli")),
    ("vlaug.evaluate", ("vlaug.report", "vlaug.cli")),
])
def test_each_layer_imports_only_the_ones_before_it(layer, later):
    """config (runs) -> methods -> run (evaluate) -> report: no layer imports a later one."""
    graph = import_graph()
    reached, todo = set(), [layer]
    while todo:  # everything the layer imports, directly or not
        for w in graph[todo.pop()]:
            if w not in reached:
                reached.add(w)
                todo.append(w)
    assert not {m for m in reached if m.startswith(later)}, sorted(m for m in reached if m.startswith(later))


def test_the_docs_method_table_is_the_registrys():
    """docs/probes.md's method table is generated from the registry (summaries, options and
    defaults): a method added, or a default changed, is in the docs once regenerated."""
    from vlaug.methods.__main__ import BEGIN, END, with_table

    page = (PACKAGE.parent / "docs" / "probes.md").read_text(encoding="utf-8")
    assert BEGIN in page and END in page
    assert page == with_table(page), "regenerate it: python -m vlaug.methods --docs docs/probes.md"
