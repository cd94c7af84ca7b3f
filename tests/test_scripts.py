"""The scripts nobody imports (entry points, benchmarks): their imports resolve. Most import
inside ``main()``, after the arguments are parsed, so a removed function only showed when a user
ran the script (``experiments/demo.py`` imported a ``bad_videos`` gone for days)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("experiments/*.py"), *ROOT.glob("bench/*.py")])


def finegrain_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from finegrain... import name``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "finegrain":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_finegrain_import_of_a_script_resolves(path):
    missing = []
    for line, module, name in finegrain_imports(path):
        try:
            imported = importlib.import_module(module)
        except ImportError as e:  # an optional dependency of that module is fine to lack here
            if (e.name or "").split(".")[0] == "finegrain":
                missing.append(f"line {line}: {module} ({e})")
            continue
        if not hasattr(imported, name):
            try:  # a submodule (``from finegrain.models import dsts``)
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"line {line}: {name} from {module}")
    assert not missing, f"{path.relative_to(ROOT)}: " + "; ".join(missing)
