"""The package's import graph, read from the source (no imports run): ``python tools/import_graph.py``.

Every ``import`` counts, wherever it is written: at module level, inside a function (a lazy
import is still a dependency) and under ``if TYPE_CHECKING:``. ``tests/test_architecture.py``
checks the graph for cycles, cross-module private imports and the layering of the rooms;
run as a script, it rewrites the room-level picture in ``docs/architecture.md`` (a Mermaid
graph between the markers below), so the picture cannot drift from the code.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sane_ray"
BEGIN, END = "<!-- import-graph:begin -->", "<!-- import-graph:end -->"


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a name imported from a package resolves to its submodule if one exists)
    names: tuple[str, ...]  # names taken with ``from target import ...``
    line: int


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([name] if name else []))


def imports(root: Path = ROOT) -> list[Import]:
    """Every import of a package module by a package module."""
    known = modules(root)
    found = []
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append(Import(module, alias.name, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node.level, node.module)
                if target.split(".")[0] != PACKAGE:
                    continue
                plain = []
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in known:  # `from sane_ray.x import y` where y is a module
                        found.append(Import(module, sub, (), node.lineno))
                    else:
                        plain.append(alias.name)
                if plain:
                    found.append(Import(module, target, tuple(plain), node.lineno))
    return found


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package's ``__init__`` counts as a module)."""
    edges: dict[str, set[str]] = {m: set() for m in modules(root)}
    for imp in imports(root):
        if imp.target != imp.source and imp.target in edges:
            edges[imp.source].add(imp.target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    sys.setrecursionlimit(max(1000, 10 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def private_imports(root: Path = ROOT) -> list[str]:
    """``source:line imports target._name`` for each private name taken from another module."""
    return [f"{i.source}:{i.line} imports {i.target}.{n}" for i in imports(root) for n in i.names
            if n.startswith("_") and not n.startswith("__") and i.target != i.source]


def room(module: str) -> str:
    """``sane_ray.train.loop`` -> ``train``; a top-level module is its own room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def room_edges(root: Path = ROOT) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for source, targets in graph(root).items():
        rooms.setdefault(room(source), set()).update(room(t) for t in targets if room(t) != room(source))
    return rooms


def reaches(edges: dict[str, set[str]], start: str, goal: str, avoid: str) -> bool:
    """Whether ``goal`` is reachable from ``start`` without passing through ``avoid``."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt == goal:
                return True
            if nxt not in seen and nxt != avoid:
                seen.add(nxt)
                todo.append(nxt)
    return False


def implied(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """``edges`` less each edge a -> b that another path from a to b already shows (a readable picture)."""
    return {a: {b for b in targets if not any(reaches(edges, c, b, a) for c in targets - {b})}
            for a, targets in edges.items()}


def mermaid(root: Path = ROOT) -> str:
    """The room-level graph as a Mermaid flowchart: an arrow points at the room imported; an import
    that a longer path already shows is left out."""
    lines = ["```mermaid", "flowchart TD"]
    for source, targets in sorted(implied(room_edges(root)).items()):
        lines += [f"    {source} --> {target}" for target in sorted(targets)]
    return "\n".join(lines + ["```"])


def update_doc(doc: Path) -> bool:
    """Rewrite the picture between the markers of ``doc``; True when it changed."""
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{mermaid()}\n{END}{tail}"
    if new != text:
        doc.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_doc(ROOT / "docs" / "architecture.md")
    print("docs/architecture.md " + ("updated" if changed else "already current"))
