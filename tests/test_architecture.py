"""The package's shape: its import graph has no circles, and no module imports one on a floor above it.

Read from the source with ``ast`` (imports inside functions count too), so a
layering mistake fails here before it becomes a circle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Floors, bottom up: a module may import modules of its own floor or of floors below it.
FLOORS = (
    ("shared", ("cqil_fx.config", "cqil_fx.errors", "cqil_fx.stack", "cqil_fx.tokens", "cqil_fx.progress",
                "cqil_fx.fingerprint")),
    ("passes", ("cqil_fx.passes",)),
    ("eager", ("cqil_fx.eager",)),
    ("planning", ("cqil_fx.planning",)),
    ("runtime", ("cqil_fx.graph",)),
    ("tools", ("cqil_fx.tools",)),
    ("package", ("cqil_fx",)),
)


def _modules() -> dict[str, Path]:
    """Module name -> file, for cqil_fx/ and passes/ (installed as cqil_fx.passes)."""
    found = {}
    for folder, package in ((ROOT / "cqil_fx", "cqil_fx"), (ROOT / "passes", "cqil_fx.passes")):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            stem = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _floor(module: str) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(FLOORS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[1]


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        g.add_edges_from((name, target) for target in _imports(name, path, modules))
    return g


def test_the_import_graph_has_no_circles(graph):
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import circles: " + "; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def test_no_module_imports_one_on_a_floor_above_it(graph):
    upward = [f"{a} ({FLOORS[_floor(a)][0]}) imports {b} ({FLOORS[_floor(b)][0]})"
              for a, b in graph.edges if _floor(b) > _floor(a)]
    assert not upward, "\n".join(upward)


def test_the_passes_import_only_the_shared_value_types(graph):
    allowed = {"cqil_fx.errors", "cqil_fx.stack"}
    outside = [f"{a} imports {b}" for a, b in graph.edges
               if a.startswith("cqil_fx.passes") and not b.startswith("cqil_fx.passes") and b not in allowed]
    assert not outside, "\n".join(outside)


def test_the_runtime_does_not_import_the_eager_side(graph):
    """The graph side runs what Dynamo captured; the reference semantics are for tests and quality tools."""
    eager = [f"{a} imports {b}" for a, b in graph.edges
             if a.startswith("cqil_fx.graph") and b.startswith("cqil_fx.eager")]
    assert not eager, "\n".join(eager)


def test_every_mode_in_the_table_is_one_module_with_its_class():
    from cqil_fx.config import MODE_TABLE
    from cqil_fx.graph.modes import ExecutionMode, mode_class

    for row in MODE_TABLE:
        cls = mode_class(row.name)
        assert issubclass(cls, ExecutionMode) and cls.name == row.name
        assert cls.__module__ == row.module
