"""How commands print machine-readable output: one strict JSON object on stdout."""

from __future__ import annotations

import json

import click

from prismoe_store.inspect import jsonable


def echo_json(obj) -> None:
    """Print ``obj`` as one JSON object (non-finite floats as null, NumPy scalars as numbers)."""
    click.echo(json.dumps(jsonable(obj), allow_nan=False))
