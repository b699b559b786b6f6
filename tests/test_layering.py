"""Every import points down the layers of docs/DESIGN.md, and no modules import each other in a circle.

Layers, lowest first: common < world < models < evals < experiments < analysis, benchmarks. A module may import
its own layer or a lower one; the one allowed upward edge is ``experiments.launch -> analysis.figures`` (a sweep
draws its figure). Every ``import`` / ``from ... import`` counts, at the top of a file or inside a function, and
relative imports are resolved; imports of anything outside the project are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS: dict[str, int] = {"common": 0, "world": 1, "models": 2, "evals": 3, "experiments": 4, "analysis": 5,
                          "benchmarks": 5}
ALLOWED_UPWARD = {("experiments.launch", "analysis.figures")}


def project_modules(root: Path, packages: dict[str, int] = LAYERS) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the layered packages of ``root``."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement of module ``name``, nested ones included.

    ``from a.b import c`` names module ``a.b.c`` when that is a module of the project, else ``a.b``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            # the longest project module the dotted name starts with (``import a.b.c`` -> a.b.c)
            parts = target.split(".")
            for k in range(len(parts), 0, -1):
                candidate = ".".join(parts[:k])
                if candidate in modules:
                    found.append((candidate, node.lineno))
                    break
    return found


def import_graph(root: Path, packages: dict[str, int] = LAYERS) -> dict[str, list[tuple[str, int]]]:
    """module -> [(imported project module, line)] over the whole tree."""
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]], packages: dict[str, int] = LAYERS,
                   allowed: set[tuple[str, str]] = ALLOWED_UPWARD) -> list[str]:
    """"src:line -> dst" for every import of a higher layer that is not allowed."""
    bad = []
    for src, edges in graph.items():
        for dst, line in edges:
            if packages[dst.split(".")[0]] > packages[src.split(".")[0]] and (src, dst) not in allowed:
                bad.append(f"{src}:{line} -> {dst}")
    return bad


def cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(w == v for w, _ in graph.get(v, [])):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_layers() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50 and any(graph.values())  # the walk found the project
    assert upward_imports(graph) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(ROOT)) == []


def test_the_allowed_upward_edge_exists() -> None:
    # if the launcher stops drawing figures, the exception should go too
    edges = {dst for dst, _ in import_graph(ROOT)["experiments.launch"]}
    assert "analysis.figures" in edges


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("nested", [False, True])
def test_the_checker_finds_an_injected_upward_import_and_cycle(tmp_path: Path, nested: bool) -> None:
    """A made-up tree with one upward import (top-level or inside a function) and a three-module circle."""
    indent = "def f():\n    " if nested else ""
    _write(tmp_path, {
        "common/__init__.py": "",
        "common/low.py": "import json\n",
        "world/__init__.py": "",
        "world/a.py": f"{indent}from models.m import thing\n",
        "models/__init__.py": "",
        "models/m.py": "from common.low import json\nfrom . import n\n",
        "models/n.py": "import models.o\n",
        "models/o.py": "from models import m\n",
    })
    packages = {"common": 0, "world": 1, "models": 2}
    graph = import_graph(tmp_path, packages)
    assert upward_imports(graph, packages, set()) == [f"world.a:{2 if nested else 1} -> models.m"]
    assert cycles(graph) == [["models.m", "models.n", "models.o"]]
