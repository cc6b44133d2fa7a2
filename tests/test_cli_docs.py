"""docs/cli.md is exactly what scripts/gen_cli_docs.py writes from the click app now."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent
FIX = "docs/cli.md is stale: run `python scripts/gen_cli_docs.py` and commit the result"


def _script():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paths(group: click.Group, prefix: str = "prismoe"):
    ctx = click.Context(group, info_name=prefix)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd.hidden:
            continue
        yield f"{prefix} {name}", cmd
        if isinstance(cmd, click.Group):
            yield from _paths(cmd, f"{prefix} {name}")


def test_cli_md_is_current():
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == _script().render(), FIX


def test_every_command_and_option_is_documented():
    text = _script().render()
    assert text.startswith("# `prismoe` command reference")
    for path, cmd in _paths(main):
        assert f"\n## {path}\n" in text, path
        assert f"{path} [OPTIONS]" in text, path
        section = text.split(f"\n## {path}\n", 1)[1].split("\n## ", 1)[0]
        for p in cmd.params:
            if isinstance(p, click.Option) and "--help" not in p.opts and not p.hidden:
                assert f"`{p.opts[0]}" in section or f", {p.opts[0]}" in section, (path, p.opts)


def test_check_flag(tmp_path, capsys):
    script = _script()
    out = tmp_path / "cli.md"
    assert script.main(["-o", str(out)]) == 0
    assert script.main(["--check", "-o", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert script.main(["--check", "-o", str(out)]) == 1
    assert "python scripts/gen_cli_docs.py" in capsys.readouterr().err


def test_markdown_escaping():
    md = _script()._md
    assert md("max |A - B| <= atol, x*y, lm_head, _private") == \
        "max \\|A - B\\| &lt;= atol, x\\*y, lm_head, \\_private"
