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
