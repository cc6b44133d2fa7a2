"""The layout's rules, checked on the source: sub-packages per stage, no import cycle, no private
name imported across modules, modules readable in one sitting, public surfaces that resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prismoe_store"
MAX_LINES = 500  # "readable in one sitting"; the issue allows about this many
STAGES = ("stores", "sources", "data", "fit", "gates", "head", "runtime", "bench", "inspection")


def modules() -> dict[str, Path]:
    """Every module of the package and the CLI, by dotted name."""
    found = {}
    for base in (PACKAGE, ROOT / "cli"):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, list[str], bool]]:
    """``(module imported, names taken from it, at module level?)`` for the project's own imports,
    function-level (lazy) ones included: a lazy import still ties the modules together."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] in ("prismoe_store", "cli"):
                out.append((target, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("prismoe_store", "cli"):
                    out.append((a.name, [], id(node) in top))
    return out


def graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (``from pkg import mod`` resolves to the module)."""
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names, _ in imports(name, path):
            for n in names or [""]:
                sub = f"{target}.{n}" if n else target
                dest = sub if sub in mods else target
                if dest in mods and dest != name:
                    edges[name].add(dest)
    return edges


def test_the_layout_reads_as_the_pipeline():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
    flat = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(flat) <= 5, f"top-level modules outside the stages: {flat}"


def test_no_import_cycle():
    edges = graph()
    # package __init__ files only re-export lazily; an edge into a package is an edge to its modules
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_checks_see_what_they_look_for(tmp_path):
    assert len(modules()) > 60 and "prismoe_store.gates.training" in modules()
    probe = tmp_path / "probe.py"
    probe.write_text("from prismoe_store.gates.training import GateRun, _private\nfrom . import sibling\n")
    found = imports("prismoe_store.gates.probe", probe)
    assert ("prismoe_store.gates.training", ["GateRun", "_private"], True) in found
    assert ("prismoe_store.gates", ["sibling"], True) in found
    assert "prismoe_store.fit.statistics" in graph()["prismoe_store.fit.job"]


def test_no_private_name_is_imported_across_modules():
    bad = []
    for name, path in modules().items():
        for target, names, _ in imports(name, path):
            bad += [f"{name} imports {target}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__") and target != name]
    assert not bad, "\n".join(bad)


def test_modules_are_readable_in_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("stage", STAGES)
def test_public_surfaces_resolve(stage):
    package = importlib.import_module(f"prismoe_store.{stage}")
    assert package.__all__, stage
    for name in package.__all__:
        assert getattr(package, name) is not None, f"prismoe_store.{stage}.{name}"


def test_the_cli_starts_without_torch():
    """Every `prismoe` command imports the whole CLI; torch (~2 s and ~180 MB) is imported only by the
    commands that run a model or a runtime, so `prismoe fit` and the store commands start fast."""
    import subprocess
    import sys

    code = "import sys, cli.main; print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
