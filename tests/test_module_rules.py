"""Layout rules of issue 15, checked on the source: no private name imported across modules, and the
modules of the gates, data, pipeline and CLI parts stay readable in one sitting (≤ ~500 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "prismoe_store").rglob("*.py"), *(ROOT / "cli").rglob("*.py")])
SPLIT = sorted([*(ROOT / "prismoe_store" / "gates").glob("*.py"), *(ROOT / "prismoe_store" / "data").glob("*.py"),
                ROOT / "prismoe_store" / "pipeline.py", ROOT / "prismoe_store" / "demo.py",
                *(ROOT / "cli").glob("*.py")])


def _private_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("prismoe_store", "cli"):
            out += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return out


def test_the_checks_see_the_sources(tmp_path):
    assert len(SOURCES) > 40 and (ROOT / "prismoe_store" / "gates" / "training.py") in SPLIT
    bad = tmp_path / "probe.py"  # the check finds what it looks for
    bad.write_text("import os\nfrom prismoe_store.gates.training import GateRun, _fit_gates\n")
    assert _private_imports(bad) == ["prismoe_store.gates.training._fit_gates"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_imported_across_modules(path):
    assert _private_imports(path) == []


@pytest.mark.parametrize("path", SPLIT, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_short(path):
    assert len(path.read_text().splitlines()) <= 520
