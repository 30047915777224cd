"""The package's layers point down: a module imports only from its own package or a lower layer, and no two
packages import each other, directly or through others. Every import counts, including those inside functions
(they are how a stage defers a heavy dependency, not a way around the layering)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "medfoundry"

# lowest first; a package may import from its own layer only where that makes no cycle
LAYERS = [
    {
        "medfoundry",
        "errors",
        "io",
        "runtime",
        "config",
        "manifest",
        "shuffled_order",
        "executor",
        "limits",
        "extras",
        "tables",
    },
    {"model"},  # model and tokenizer files, loaded under the safety rules: every stage reads them
    {"corpus"},
    {"tokenizer"},
    {"train", "sft"},
    {"generation"},
    {"eval"},
    {"serve"},
    {"card"},
    {"stages"},
    {"recipe", "plan"},
    {"cli", "__main__"},
]
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _package(module: str) -> str:
    """``medfoundry.train.loop`` -> ``train``; ``medfoundry.io`` -> ``io``; ``medfoundry`` -> ``medfoundry``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every medfoundry import in the file, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from medfoundry import train`` imports the package train
            found += [
                (node.lineno, f"{target}.{alias.name}" if target == "medfoundry" else target) for alias in node.names
            ]
    return sorted(
        (line, target) for line, target in found if target == "medfoundry" or target.startswith("medfoundry.")
    )


def _edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the ``file:line`` places where it happens."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(SRC.rglob("*.py")):
        source = _package(_module_name(path))
        for line, target in _imports(path):
            imported = _package(target)
            if imported != source:
                edges[source, imported].append(f"{path.relative_to(REPO)}:{line}")
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_every_package_has_a_layer():
    packages = {_package(_module_name(path)) for path in SRC.rglob("*.py")}
    assert packages - LAYER.keys() == set(), "add the new package to LAYERS in this test"


def test_no_package_imports_a_higher_layer():
    upward = [
        f"{source} (layer {LAYER[source]}) imports {target} (layer {LAYER[target]}) at {', '.join(places)}"
        for (source, target), places in sorted(_edges().items())
        if LAYER.get(target, -1) > LAYER.get(source, -1)
    ]
    assert upward == [], "\n".join(upward)


def test_no_cycle_between_packages():
    edges = _edges()
    cycles = _cycles(edges)
    detail = [
        f"{' <-> '.join(c)}: " + "; ".join(f"{s} -> {t} at {edges[s, t][0]}" for s in c for t in c if (s, t) in edges)
        for c in cycles
    ]
    assert cycles == [], "\n".join(detail)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The graph is not vacuous: an upward import inside a function, and a relative one, are found."""
    package = tmp_path / "medfoundry" / "corpus"
    package.mkdir(parents=True)
    module = package / "probe.py"
    module.write_text("def f():\n    from medfoundry.serve import app\n\nfrom ..eval import tasks\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "medfoundry")
    assert _imports(module) == [(2, "medfoundry.serve"), (4, "medfoundry.eval")]
