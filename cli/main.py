"""The ``prismoe`` click group: registers the commands and maps library errors to one line."""

from __future__ import annotations

import importlib
import os
import sys

import click

from cli.messages import BROKEN_PIPE_EXIT, INTERRUPTED_EXIT, error_line, interrupt_line
from prismoe_store.errors import PrismoeError

# Modules under cli/ that define commands; each exposes ``commands`` (a list of click commands)
# and may expose ``bench_commands``, which become subcommands of ``prismoe benchmark``.
COMMAND_MODULES = [
    "cli.fit_cmds",
    "cli.runtime_cmds",
    "cli.extract_cmds",
    "cli.inspect_cmds",
    "cli.pairs_cmds",
    "cli.collect_cmds",
    "cli.gates_cmds",
    "cli.pipeline_cmds",
    "cli.head_cmds",
]


class _Group(click.Group):
    """A click group that turns library errors into ``click.ClickException`` (one line, exit 1), and
    Ctrl-C into one line saying whether the work is kept (exit 130), instead of click's "Aborted!"."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PrismoeError as e:
            raise click.ClickException(error_line(e)) from None
        except BrokenPipeError:  # `prismoe ... | head -1`: the reader has all it wanted
            sys.stdout = open(os.devnull, "w")  # nothing more may reach the closed pipe at exit
            ctx.exit(BROKEN_PIPE_EXIT)
        except OSError as e:  # the disk is full, a folder is missing, a permission is lacking, ...
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except MemoryError:
            raise click.ClickException("out of memory: try a smaller --batch-size / --cache-mb / chunk size") from None
        except KeyboardInterrupt:
            click.echo(interrupt_line(ctx.invoked_subcommand), err=True)
            ctx.exit(INTERRUPTED_EXIT)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="prismoe-store")
def main() -> None:
    """prismoe: turn huge dense matrices into PrisMoE tile adapters, out of core."""


@main.group()
def benchmark() -> None:
    """Measure speed, memory and quality as ratios taken in one run (see docs/results.md)."""


for _name in COMMAND_MODULES:
    _mod = importlib.import_module(_name)
    for _cmd in _mod.commands:
        main.add_command(_cmd)
    for _cmd in getattr(_mod, "bench_commands", []):
        benchmark.add_command(_cmd)


def run() -> None:
    """The ``prismoe`` console script: :func:`main`, and after Ctrl-C an immediate exit.

    The interrupted job's threads (Zarr's event loop, progress bars, writers) would otherwise be
    torn down with the interpreter and print tracebacks after the one line that says the work is
    kept. Leaving at once is safe: every store survives a kill at any moment (its chunk records
    and progress records), which is what the re-run resumes from.
    """
    try:
        main()
    except SystemExit as e:
        if e.code == INTERRUPTED_EXIT:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPTED_EXIT)
        raise
