#!/usr/bin/env python
"""Write docs/cli.md, the reference of every ``prismoe`` command, from the click app itself.

Every command and every ``prismoe benchmark`` subcommand gets its usage line, its help text and a
table of its options with their help (defaults and "required" as click shows them). The short
hand-written introduction at the top lives here, in :data:`INTRO`. tests/test_cli_docs.py fails
when docs/cli.md differs from what this script writes, so run it after changing any command:

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "cli.md"
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's cli package
    sys.path.insert(0, str(ROOT))

INTRO = """\
# `prismoe` command reference

`prismoe` is the command line of prismoe_store: it extracts big matrices from checkpoints into
tile stores, collects or synthesizes activation pairs, fits PrisMoE adapters out of core, trains
their gates, runs and measures them. Every command is a thin layer over a library function of the
same name in `prismoe_store/`, so anything here can also be done from Python.

Conventions shared by the commands:

- A *store* (weights, pairs or adapter) is a Zarr v3 folder or an fsspec URL (`memory://…`,
  `s3://…`); its format and version are checked on open (see [store-format.md](store-format.md)).
- Long commands show progress bars on stderr; `-q/--quiet` silences them. `--json` prints one JSON
  object on stdout instead of text. `--plot DIR` / `--plots DIR` write PNG files into DIR.
- Bad input (a missing file or tensor, a store of the wrong format, a corrupt chunk) ends with a
  one-line `Error: …` message and exit status 1; a wrong combination of options, with status 2.
- Interrupted jobs (collect, synth, extract, tile, fit, fit-gates, head, quantize, train) resume when
  re-run with the same arguments; Ctrl-C stops them with one line saying so and exit status 130.
  Re-running one that already finished redoes nothing and exits 0 (`fit` alone refuses: pass
  `--overwrite` to refit).
- `prismoe --version` prints the version; `-h/--help` works on every command.

This file is generated from the commands' own help by `python scripts/gen_cli_docs.py`; edit the
commands (or the introduction in that script), not this file.
"""


def _md(text: str) -> str:
    """Text safe for Markdown: no accidental HTML, emphasis or table breaks."""
    text = text.replace("\\", "\\\\").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    text = text.replace("*", "\\*")
    return re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", text)  # an underscore inside a word is never emphasis


def _help_body(help_text: str | None) -> list[str]:
    """A command's help as Markdown paragraphs: click's ``\\f`` cuts it, ``\\b`` paragraphs keep their lines."""
    text = inspect.cleandoc((help_text or "").split("\f")[0])
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if lines and lines[0].strip() == "\b":
            out.append("```text\n" + "\n".join(lines[1:]) + "\n```")
        elif para.strip():
            out.append(_md(" ".join(line.strip() for line in lines)))
    return out


def _commands(group: click.Group, ctx: click.Context):
    """Yield ``(ctx, command)`` for every visible command under ``group``, depth first, by name."""
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        yield sub, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, sub)


def _anchor(path: str) -> str:
    """The anchor GitHub gives the heading ``prismoe …`` (lower case, spaces to dashes)."""
    return re.sub(r"[^a-z0-9 -]", "", path.lower()).replace(" ", "-")


def _section(ctx: click.Context, cmd: click.Command) -> list[str]:
    path = ctx.command_path
    lines = [f"## {path}", "", "```text", f"{path} {' '.join(cmd.collect_usage_pieces(ctx))}".rstrip(), "```", ""]
    for para in _help_body(cmd.help):
        lines += [para, ""]
    if isinstance(cmd, click.Group):
        lines += ["Subcommands:", ""]
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines.append(f"- [`{path} {name}`](#{_anchor(f'{path} {name}')}): "
                             f"{_md(sub.get_short_help_str(limit=120))}")
        lines.append("")
    rows = [p.get_help_record(ctx) for p in cmd.get_params(ctx)
            if isinstance(p, click.Option) and "--help" not in p.opts]
    rows = [r for r in rows if r is not None]
    if rows:
        lines += ["| Option | Description |", "| --- | --- |"]
        # a pipe inside a table cell must be escaped, even in a code span (GitHub Markdown)
        lines += ["| `" + opts.replace("|", "\\|") + f"` | {_md(' '.join(text.split()))} |" for opts, text in rows]
        lines.append("")
    return lines


def render() -> str:
    """The whole of docs/cli.md for the commands as they are now."""
    from cli.main import main as app

    root = click.Context(app, info_name="prismoe")
    found = list(_commands(app, root))
    lines = [INTRO.rstrip(), "", "## Commands", ""]
    for ctx, cmd in found:
        depth = ctx.command_path.count(" ") - 1
        lines.append(f"{'  ' * depth}- [`{ctx.command_path}`](#{_anchor(ctx.command_path)}): "
                     f"{_md(cmd.get_short_help_str(limit=120))}")
    lines.append("")
    for ctx, cmd in found:
        lines += _section(ctx, cmd)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from the prismoe click app.")
    parser.add_argument("--check", action="store_true", help="Do not write; exit 1 when docs/cli.md is stale.")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT, help="Where to write (default: docs/cli.md).")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `python scripts/gen_cli_docs.py`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
