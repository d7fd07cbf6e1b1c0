"""The house's floors (docs/architecture.md): core/ never imports Dagster or the floors above."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "icons_dagster" / "core"
# bottom to top; names on one floor may import each other
FLOORS = [("storage", "plots"), ("selection",), ("config",), ("data",), ("model",), ("features",), ("ofa", "evaluation"), ("schema",), ("stages",)]
RANK = {name: level for level, names in enumerate(FLOORS) for name in names}


def _room(module: str) -> str:
    """'icons_dagster.core.model.loading' -> 'model'."""
    return module.split(".")[2]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            if node.module == "icons_dagster.core":
                found += [f"icons_dagster.core.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_core_imports_only_its_own_floor_and_those_below():
    modules = sorted(p for p in CORE.rglob("*.py") if p.name != "__init__.py")
    assert len(modules) > 20
    upward, outside = [], []
    for path in modules:
        relative = path.relative_to(CORE)
        room = relative.parts[0].removesuffix(".py")
        assert room in RANK, f"core/{relative}: {room!r} is on no floor of docs/architecture.md"
        for module in _imports(path):
            if module.split(".")[0] == "dagster" or (module.startswith("icons_dagster.") and not module.startswith("icons_dagster.core")):
                outside.append(f"core/{relative} imports {module}")
            elif module.startswith("icons_dagster.core.") and RANK[_room(module)] > RANK[room]:
                upward.append(f"core/{relative} ({room}) imports {module} ({_room(module)})")
    assert outside == []
    assert upward == []
