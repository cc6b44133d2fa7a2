"""What the CLI says when something is wrong: library errors as one line, Ctrl-C, and warnings.

:func:`error_line` is what ``cli/main.py`` prints for a :class:`~prismoe_store.errors.PrismoeError`:
the library's message (what is wrong, and usually what to do) on one line, without the exception's
class name, shortened to about :data:`MAX_CHARS` by cutting its middle, with a hint of what to do
for the kinds whose messages do not carry one. :func:`interrupt_line` is what it prints on Ctrl-C.
"""

from __future__ import annotations

import re

import click

from prismoe_store.errors import IncompleteStoreError, PrismoeError, TensorNotFoundError

MAX_CHARS = 400  # longer messages (long paths, a listing of a checkpoint's tensors) are cut to this
KEEP_END = 160  # characters kept from the end of a long message (where it says what to do)
HINTS: dict[type, str] = {  # what to do, for messages that say only what is wrong
    TensorNotFoundError: "name one with --tensor (the aliases lm_head and embedding find the usual names)",
    IncompleteStoreError: "re-run the command that writes it (it resumes), or pass --overwrite",
}


# The library's messages name both spellings of a remedy, "pass overwrite=True / --overwrite": the
# CLI shows its own only. (Python keyword = value, then " / " or " or ", then the flag.)
BOTH_SPELLINGS = re.compile(r"\b[a-z_]+=(?:True|False|None|[\w.'\"-]+)\s+(?:/|or)\s+(--[a-z][a-z0-9-]*)")


# A library message that starts with the setting it refuses ("workers must be a power of 2, ..."):
# the CLI names the option that set it (--workers), when the command has one of that name.
LEADING_SETTING = re.compile(r"^([a-z][a-z0-9_]*) must be\b")


def cli_spelling(text: str, flags: dict[str, str] | None = None) -> str:
    """``text`` with each "keyword=value / --flag" remedy cut to the flag, and (``flags``: the
    command's options, parameter name → flag) a leading "name must be" said as "--flag must be".

    >>> cli_spelling("x.zarr holds a finished fit (pass overwrite=True / --overwrite to refit)")
    'x.zarr holds a finished fit (pass --overwrite to refit)'
    >>> cli_spelling("workers must be a power of 2, got 100", {"workers": "--workers"})
    '--workers must be a power of 2, got 100'
    """
    text = BOTH_SPELLINGS.sub(r"\1", text)
    m = LEADING_SETTING.match(text)
    if m and flags and m.group(1) in flags:
        text = flags[m.group(1)] + text[m.end(1):]
    return text


def error_line(e: PrismoeError, flags: dict[str, str] | None = None) -> str:
    """One line for the user: the message, shortened, in the CLI's spelling (:func:`cli_spelling`,
    ``flags``: the command's options by parameter name), plus a hint when the message gives none.

    >>> error_line(TensorNotFoundError("no tensor 'lm_haed' in m.safetensors; it has 2 tensors: lm_head.weight, x"))
    ... # doctest: +NORMALIZE_WHITESPACE
    "no tensor 'lm_haed' in m.safetensors; it has 2 tensors: lm_head.weight, x — name one with --tensor
    (the aliases lm_head and embedding find the usual names)"
    >>> error_line(IncompleteStoreError("the adapter has no finished INT8 tiles: run `prismoe quantize` first"))
    'the adapter has no finished INT8 tiles: run `prismoe quantize` first'
    """
    text = cli_spelling(" ".join(str(e).split()), flags) or type(e).__name__
    if len(text) > MAX_CHARS:  # cut the middle: the start says what is wrong, the end what to do
        text = text[:MAX_CHARS - KEEP_END - 3].rstrip(" ,;") + " … " + text[-KEEP_END:].lstrip()
    hint = next((h for kind, h in HINTS.items() if isinstance(e, kind)), None)
    if hint and not any(said in text for said in ("--tensor", "re-run", "--overwrite", "`prismoe ")):  # no remedy yet
        text += f" — {hint}"
    return text


# Commands that keep their finished work when interrupted and finish the rest when run again
# (each resumes from its store's own progress record: rows, tiles, bands, epochs, stages).
RESUMABLE = ("collect", "synth", "extract", "tile", "fit", "fit-gates", "head", "quantize", "train")
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a job stopped by Ctrl-C
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: the output's reader went away (`| head`); nothing is printed


STARTS_OVER = ("restart", "overwrite")  # options whose command starts over instead of resuming


def interrupt_line(command: str | None, starts_over: str | None = None) -> str:
    """The one line printed when Ctrl-C stops ``command`` (the subcommand's name); ``starts_over``:
    the flag of :data:`STARTS_OVER` it was given (the same command again would start over).

    >>> interrupt_line("collect")
    'interrupted: the work finished so far is kept; run the same command again to continue it'
    >>> interrupt_line("fit-gates", "--restart").split("; ")[1]
    'run the command again without --restart to continue it (with --restart it starts over)'
    >>> interrupt_line("compare")
    'interrupted'
    """
    if command not in RESUMABLE:
        return "interrupted"
    if starts_over:
        return (f"interrupted: the work finished so far is kept; run the command again without {starts_over} to "
                f"continue it (with {starts_over} it starts over)")
    return "interrupted: the work finished so far is kept; run the same command again to continue it"


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr."""
    click.echo(f"warning: {message}", err=True)


def warn_padding(pairs, workers: int) -> None:
    """Warn when ``workers`` tiles per pipe over the pairs' ``d_in × d_out`` leave many tiles all padding
    (:func:`prismoe_store.grid.padding_advice`); silent when the pairs cannot be opened (the command
    itself then says why)."""
    from prismoe_store.errors import StoreError
    from prismoe_store.grid import padding_advice
    from prismoe_store.stores.pairs import PairsStore

    try:
        store = PairsStore.open(pairs)
    except (StoreError, OSError):
        return
    if store.d_out < 1:
        return
    advice = padding_advice(store.d_in, store.d_out, workers)
    if advice:
        warn(advice)
