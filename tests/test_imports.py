"""Every module under src/tether imports (catches names used but never imported, broken imports and import-time
errors). Modules are found by walking the package with pkgutil and, since pkgutil does not descend into
directories without an __init__.py, also by listing every .py file in the tree: nothing is skipped silently.
A module that fails to import fails its own test case, named by the module."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import tether

PACKAGE_DIR = Path(tether.__file__).parent


def _walked() -> set[str]:
    return {"tether"} | {info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="tether.")}


def _source_files() -> set[str]:
    names = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = sorted(_walked() | _source_files())


def test_core_modules_are_found():
    """The discovery itself works (an empty or partial list would make the import test vacuous)."""
    assert {"tether", "tether.objectives", "tether.heads", "tether.statistics", "tether.functional"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    """The module imports without error."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report any failure with the module's name
        pytest.fail(f"importing {name} failed: {type(exc).__name__}: {exc}")


def _module_level_imports(name: str) -> set[str]:
    """The tether modules `name` imports at module level, `if TYPE_CHECKING:` blocks included (imports inside
    functions are deferred and left out)."""
    import ast

    path = PACKAGE_DIR.parent.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.parse(path.read_text()).body:
        body = node.body if isinstance(node, ast.If) else [node]  # `if TYPE_CHECKING:` imports count
        for stmt in body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith("tether"):
                found.add(stmt.module)
            elif isinstance(stmt, ast.Import):
                found.update(a.name for a in stmt.names if a.name.startswith("tether"))
    return {m for m in found if m in MODULES and m != name}


def test_module_level_imports_have_no_cycle():
    """The package is layered: no module imports, at module level, one that imports it back (directly or
    through others). A cycle (e.g. modeling <-> reference, now both above tether.causal_lm) works only by
    accident of import order."""
    graph = {name: _module_level_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
