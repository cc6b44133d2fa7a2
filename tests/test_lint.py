"""The project's linter (ruff) and type checker (mypy) pass on the repository.

Both read their settings from pyproject.toml ([tool.ruff], [tool.mypy]) and run as they would in
CI: from the repository root, in the interpreter running the tests.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' brings it)")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, f"ruff check . found problems:\n{proc.stdout}{proc.stderr}"


def test_mypy_finds_nothing():
    proc = _run("mypy")  # files and settings from [tool.mypy]
    assert proc.returncode == 0, f"mypy found problems:\n{proc.stdout}{proc.stderr}"
