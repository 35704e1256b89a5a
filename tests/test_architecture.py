"""The package's shape (issue 24): no import cycle, no private name taken across modules, lower rooms
that never reach up, and an architecture picture that matches the code."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import import_graph as ig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOWER = {"train", "data", "weights", "zoo", "model"}  # the rooms a pretraining worker runs
UPPER = {"embed", "probe", "sample", "tune"}  # the jobs built on them


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Lazy, type-only and relative imports count, and a cycle through them is found."""
    pkg = tmp_path / ig.PACKAGE
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .x import public\n")
    (pkg / "a" / "x.py").write_text("def public():\n    from sane_ray.b import _hidden\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sane_ray.a import x\n"
                              "_hidden = 1\n")
    edges = ig.graph(tmp_path)
    assert edges["sane_ray.a"] == {"sane_ray.a.x"} and edges["sane_ray.b"] == {"sane_ray.a.x"}
    assert ig.cycles(edges) == [["sane_ray.a.x", "sane_ray.b"]]
    assert ig.private_imports(tmp_path) == ["sane_ray.a.x:2 imports sane_ray.b._hidden"]


def test_no_import_cycle():
    assert ig.cycles(ig.graph()) == []


def test_no_private_name_is_imported_from_another_module():
    assert ig.private_imports() == []


def test_lower_rooms_import_nothing_from_the_jobs_above_them():
    up = [f"{source} -> {target}" for source, targets in ig.graph().items() for target in targets
          if ig.room(source) in LOWER and ig.room(target) in UPPER]
    assert up == []


def test_the_architecture_picture_matches_the_code():
    doc = ig.ROOT / "docs" / "architecture.md"
    text = doc.read_text()
    assert f"{ig.BEGIN}\n{ig.mermaid()}\n{ig.END}" in text, "run: python tools/import_graph.py"


MAX_BODY_LINES = 50


def test_no_function_body_is_longer_than_a_screen_without_saying_why():
    """A body (docstring excluded) over MAX_BODY_LINES lines needs "long because" in its docstring."""
    import ast

    long = []
    for path in sorted((ROOT / "sane_ray").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node) or ""
            body = node.body[1:] if doc else node.body
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if lines > MAX_BODY_LINES and "long because" not in doc.lower():
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
