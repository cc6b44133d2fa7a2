"""``prismoe synth`` and ``prismoe pairs-info``: make synthetic pairs, describe a pairs store."""

from __future__ import annotations

import click

from cli.options import compressor_option, json_option, overwrite_option
from cli.output import echo_json, output_store
from cli.progress import bar, quiet_option
from prismoe_store.data.synth import KINDS, SynthSpec, synthesize, truth_summary
from prismoe_store.grid import DEFAULT_WORKERS
from prismoe_store.inspection.common import short_value
from prismoe_store.stores.formats import StoreOptions
from prismoe_store.stores.pairs import PairsStore


@click.command("synth")
@click.option("-o", "--output", "store", required=True, callback=output_store,
              help="Pairs store path or fsspec URL (e.g. memory://x).")
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Number of pairs S (disk is the only limit).")
@click.option("--d-in", type=click.IntRange(min=1), required=True, help="Width M of x.")
@click.option("--d-out", type=click.IntRange(min=1), required=True, help="Width N of z.")
@click.option("--kind", type=click.Choice(KINDS), default="linear", show_default=True,
              help="linear: z = x Wᵀ + noise; gated: a piecewise-linear target whose inputs each use a "
                   "1/--regions share of the tiles.")
@click.option("--noise", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="σ of the Gaussian noise on z (the clean target has unit-scale entries).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the ground truth and every row (same seed, same bytes, however chunked).")
@click.option("--regions", type=click.IntRange(min=1), default=4, show_default=True,
              help="gated: number of input regions (gating directions).")
@click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True,
              help="gated: tiles per pipe of the grids the target's blocks align with (a power of 2).")
@click.option("--rows-per-chunk", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Rows per chunk of the store; memory holds about one chunk.")
@compressor_option("none", "Chunk compressor (every chunk also carries a crc32c checksum); none decodes fastest "
                           "for fits.")
@overwrite_option("Replace an existing store instead of resuming/extending it.")
@json_option("Print a JSON summary on stdout.")
@quiet_option
def synth_cmd(store, rows, d_in, d_out, kind, noise, seed, regions, workers, rows_per_chunk, compressor,
              overwrite, as_json, quiet):
    """Write synthetic pairs with a known ground truth (saved in the store's truth group).

    Rows are written chunk by chunk, so the store may be far larger than RAM. Re-running with the
    same settings resumes an interrupted run (or extends the store to a larger --rows).
    """
    spec = SynthSpec(rows=rows, d_in=d_in, d_out=d_out, kind=kind, noise=noise, seed=seed, regions=regions,
                     workers=workers)
    with bar("synth", quiet=quiet, unit="row") as progress:
        pairs = synthesize(store, spec, rows_per_chunk=rows_per_chunk, options=StoreOptions(compressor=compressor),
                           overwrite=overwrite, progress=progress)
    summary = _summary(pairs)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"{summary['rows']} {kind} pairs {d_in}→{d_out} (seed {seed}, noise {noise:g}) in {store}")


@click.command("pairs-info")
@click.argument("store")
@json_option()
def pairs_info_cmd(store, as_json):
    """Show a pairs store's rows, widths, chunking, provenance and ground truth (if synthetic)."""
    summary = _summary(PairsStore.open(store))
    if as_json:
        echo_json(summary)
        return
    if summary["chunks_z"] is None:
        click.echo(f"{summary['url']}: {summary['rows']} rows of hidden states only, x [{summary['rows']}, "
                   f"{summary['d_in']}] (no z: for head gates, not fits)")
        click.echo(f"chunks: x {tuple(summary['chunks_x'])}")
    else:
        click.echo(f"{summary['url']}: {summary['rows']} pairs, x [{summary['rows']}, {summary['d_in']}], "
                   f"z [{summary['rows']}, {summary['d_out']}]")
        click.echo(f"chunks: x {tuple(summary['chunks_x'])}, z {tuple(summary['chunks_z'])}")
    click.echo("provenance:")
    for line in _tree(summary["provenance"]):
        click.echo(line)
    if summary["truth"]:
        t = summary["truth"]
        click.echo(f"ground truth: {t['kind']}, w {tuple(t['w'])}, {t['regions']} region(s)")


def _summary(pairs: PairsStore) -> dict:
    return {"url": pairs.url, "rows": pairs.rows, "d_in": pairs.d_in, "d_out": pairs.d_out,
            "rows_per_chunk": pairs.rows_per_chunk, "chunks_x": list(pairs.x.chunks),
            "chunks_z": None if pairs.hidden_only else list(pairs.z.chunks), "provenance": pairs.provenance,
            "truth": None if pairs.hidden_only else truth_summary(pairs)}


def _tree(value: dict, indent: int = 2):
    """Indented ``key: value`` lines of a nested dict (a content hash as key is shortened).

    >>> list(_tree({"upper": {"path": "m.gguf", "files": [1, 2]}, "tokens": 5}))
    ['  upper:', '    path: m.gguf', '    files: [1, 2]', '  tokens: 5']
    """
    for k, v in value.items():
        key = f"{k[:12]}…" if isinstance(k, str) and len(k) == 64 else k  # sha256 of a text
        if isinstance(v, dict) and v:
            yield f"{' ' * indent}{key}:"
            yield from _tree(v, indent + 2)
        else:
            yield f"{' ' * indent}{key}: {short_value(v, 100)}"


commands = [synth_cmd, pairs_info_cmd]
