"""How commands print machine-readable output (one strict JSON object on stdout) and check the
stores they are asked to write (``-o``)."""

from __future__ import annotations

import json

import click

from prismoe_store.inspection.common import jsonable
from prismoe_store.stores.formats import is_persistent, location


def echo_json(obj) -> None:
    """Print ``obj`` as one JSON object (non-finite floats as null, NumPy scalars as numbers)."""
    click.echo(json.dumps(jsonable(obj), allow_nan=False))


def output_store(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback of every ``-o`` that names a store: refuse an empty or odd URL before anything
    runs (:class:`~prismoe_store.errors.StoreError`, one line), and say so when the store will not
    outlive the command (``memory://``)."""
    if value is None:
        return value
    location(value, write=True)
    if not is_persistent(value):
        click.echo(f"note: {value} is an in-memory store: it is gone when this command exits "
                   "(give a path to keep it)", err=True)
    return value


def note_input_layer(rows, store=None) -> None:
    """Say on stderr when the input ``rows`` come from another model layer than the adapter ``store``
    expects: a head (or ``store`` None: a head being built), the last layer's; a fitted adapter, its
    training pairs' layer (:mod:`prismoe_store.stores.pairs`: ``head_input_note``, ``fitted_input_note``)."""
    from prismoe_store.stores.pairs import fitted_input_note, head_input_note

    if not rows:
        return
    if store is None or store.layout == "partition":
        note = head_input_note(rows)
    else:
        record = store.fit_record()
        fitted_on = (record.pairs or {}).get("url") if record is not None else None
        note = fitted_input_note(rows, fitted_on) if fitted_on else None
    if note:
        click.echo(note, err=True)


def open_adapter(adapter: str, other: str | None = None, *, mode: str = "r", require_complete: bool = False):
    """Open a command's ADAPTER argument; when that is another kind of store and ``other`` (the
    command's next argument) is an adapter store, the error says the two were given the other way round."""
    from prismoe_store.stores.adapter import AdapterStore

    return _open_or_swapped(lambda: AdapterStore.open(adapter, mode, require_complete=require_complete),
                            other, "adapter", "is one: give the adapter first")


def open_pairs(pairs: str, output: str | None = None):
    """Open a command's PAIRS argument; when that is another kind of store and ``output`` (the
    store the command would write) is a pairs store, the error says the two were given the other way round."""
    from prismoe_store.stores.pairs import PairsStore

    return _open_or_swapped(lambda: PairsStore.open(pairs), output, "pairs",
                            "(the output) is one: give the pairs first and the adapter to write with -o")


def _open_or_swapped(open_store, other: str | None, kind: str, advice: str):
    """``open_store()``; when it finds another kind of store and ``other`` holds a ``kind`` store, its
    error goes on with ``", but OTHER " + advice``."""
    from prismoe_store.errors import StoreFormatError
    from prismoe_store.stores.formats import existing_kind

    try:
        return open_store()
    except StoreFormatError as e:
        if other is not None and existing_kind(str(other)) == kind:
            raise StoreFormatError(f"{e}, but {other} {advice}") from None
        raise
