"""The package's shape: no import cycles between mcit's modules, lazy (in-function) imports
included, since a lazy cycle is still a cycle in the design (a package loading its own plugins
at the top is fine: the plugins import the package's core module, never the package)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for f in (SRC / "mcit").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mcit"):
                graph[m] |= {t for t in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if t in modules}
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in modules}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_known_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "mcit.assembly" in graph["mcit.runner"] and "mcit.assembly" in graph["mcit.bench"]
    assert cycles(graph) == []


def test_methods_and_models_stay_below_the_runner():
    """Methods, models and similarity never reach for the runner; the model loader never trains."""
    graph = import_graph()
    low = [m for m in graph if m.startswith(("mcit.methods", "mcit.models", "mcit.similarity", "mcit.assembly"))]
    assert low and not [m for m in low if "mcit.runner" in graph[m]]
    assert "mcit.train" not in graph["mcit.models.load"]
