"""The ``prismoe`` click group: registers the commands and maps library errors to one line."""

from __future__ import annotations

import importlib
import os
import sys

import click

from cli.messages import BROKEN_PIPE_EXIT, INTERRUPTED_EXIT, STARTS_OVER, error_line, interrupt_line
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
            raise click.ClickException(error_line(e, ctx.meta.get(_FLAGS_KEY))) from None
        except BrokenPipeError:  # `prismoe ... | head -1`: the reader has all it wanted
            sys.stdout = open(os.devnull, "w")  # nothing more may reach the closed pipe at exit
            ctx.exit(BROKEN_PIPE_EXIT)
        except OSError as e:  # the disk is full, a folder is missing, a permission is lacking, ...
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except MemoryError:
            raise click.ClickException("out of memory: try a smaller --batch-size / --cache-mb / chunk size") from None
        except KeyboardInterrupt:
            click.echo(interrupt_line(ctx.invoked_subcommand, ctx.meta.get(_STARTS_OVER_KEY)), err=True)
            ctx.exit(INTERRUPTED_EXIT)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """Click's, noting in ``ctx.meta`` the start-over flag (``--restart``, ``--overwrite``) the
        subcommand was given, for the line printed on Ctrl-C, and its options' flags, for error lines."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            given = [opt for p in cmd.params if p.name in STARTS_OVER for opt in p.opts if opt in rest]
            ctx.meta[_STARTS_OVER_KEY] = given[0] if given else None
            ctx.meta[_FLAGS_KEY] = {p.name: long[0] for p in cmd.params if isinstance(p, click.Option) and p.name
                                    and (long := [o for o in p.opts if o.startswith("--")])}
        return name, cmd, rest


_STARTS_OVER_KEY = "prismoe.starts_over"  # ctx.meta: the start-over flag the subcommand was given
_FLAGS_KEY = "prismoe.flags"  # ctx.meta: the subcommand's options, parameter name -> flag (for error lines)


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
    """The ``prismoe`` console script: :func:`main`, then an immediate exit.

    A command returns once its work is done and written, so all the interpreter's teardown would
    do is stop idle threads (Zarr's event loop, the thread pools) and free memory: 0.15–0.2 s at
    the end of a fit on the 2-core machine this was measured on. After Ctrl-C that teardown would
    also print tracebacks of the interrupted job's threads after the one line that says the work
    is kept. Leaving at once is safe: every store survives a kill at any moment (its chunk records
    and progress records), which is what a re-run resumes from. A command that leaves child
    processes running (a local Dask cluster) exits the normal way, so that they are cleaned up.
    """
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    if not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
        raise SystemExit(code)
    if code != INTERRUPTED_EXIT and _children_alive():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _children_alive() -> bool:
    """Whether this process has started child processes that are still running."""
    mp = sys.modules.get("multiprocessing")
    return bool(mp is not None and mp.active_children())
