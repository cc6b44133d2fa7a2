"""``prismoe extract`` and ``prismoe tile``: checkpoint tensors / matrix files → a weights store."""

from __future__ import annotations

from pathlib import Path

import click

from cli.options import compressor_option, json_option, overwrite_option
from cli.output import echo_json, output_store
from cli.progress import bar, quiet_option
from prismoe_store.data.extract import extract, format_extract, tile
from prismoe_store.grid import DEFAULT_WORKERS
from prismoe_store.stores.formats import StoreOptions
from prismoe_store.stores.weights import WeightsStore


def _store_options(f):
    """Options shared by both commands: output store, grid, dtype and encoding."""
    options = [
        click.option("-o", "--output", "store", required=True, callback=output_store,
                     help="Store path or fsspec URL (e.g. memory://x)."),
        click.option("--workers", type=int, default=DEFAULT_WORKERS, show_default=True,
                     help="Tiles per grid (a power of 2)."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "source"]), default="float32",
                     show_default=True, help="Stored dtype; 'source' keeps fp16/fp64, else float32."),
        compressor_option("zstd", "Codec for every chunk (a crc32c checksum is always added)."),
        click.option("--shard", is_flag=True, help="One Zarr shard per band of tiles (many small tiles)."),
        overwrite_option("Replace an existing store instead of resuming into it."),
        json_option("Print a JSON summary on stdout."),
        quiet_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command("extract")
@click.argument("source")
@click.option("--tensor", "-t", "tensors", multiple=True, default=("lm_head",), show_default=True,
              help="Tensor name or alias (lm_head, embedding), or STORE_NAME=SOURCE_NAME; repeat for several.")
@click.option("--allow-global", "allow_globals", multiple=True, metavar="MODULE.NAME",
              help="Let a trusted PyTorch pickle use this global (e.g. argparse.Namespace); repeatable.")
@_store_options
def extract_cmd(source, tensors, allow_globals, store, workers, dtype, compressor, shard, overwrite, as_json, quiet):
    """Extract 2-D tensors of SOURCE (.safetensors, HF folder, .pt/.bin, .gguf or split GGUF set, .npy)
    into a tile store.

    Prints which tensor each name resolved to and why (lm_head falls back to the embedding only
    when the checkpoint says the head is tied). Streams block by block; re-running into the same
    store finishes an interrupted extraction from the same checkpoint (another one is refused).
    """
    wanted = dict(_name_pair(t) for t in tensors)
    options = StoreOptions(compressor=compressor, shard=shard)
    with bar("extract", quiet=quiet, unit="tile") as progress:
        result = extract(source, store, tensors=wanted, workers=workers, dtype=dtype, options=options,
                         overwrite=overwrite, progress=progress, allow_globals=allow_globals)
    _report(result, list(wanted), as_json)


def _name_pair(spec: str) -> tuple[str, str]:
    """``"lm_head=model.embed_tokens.weight"`` -> (store name, source name); a plain name is both."""
    store_name, sep, source_name = spec.partition("=")
    if sep and (not store_name or not source_name):
        raise click.BadParameter(f"expected STORE_NAME=SOURCE_NAME, got {spec!r}", param_hint="--tensor")
    return (store_name, source_name) if sep else (spec, spec)


@click.command("tile")
@click.argument("matrix")
@click.option("--name", default=None, help="Tensor name in the store (default: the file's stem).")
@_store_options
def tile_cmd(matrix, name, store, workers, dtype, compressor, shard, overwrite, as_json, quiet):
    """Tile the one matrix in MATRIX (.npy or .pt) into a weights store.

    Re-running into the same store finishes an interrupted run from the same file.
    """
    options = StoreOptions(compressor=compressor, shard=shard)
    with bar("tile", quiet=quiet, unit="tile") as progress:
        result = tile(matrix, store, name=name, workers=workers, dtype=dtype, options=options,
                      overwrite=overwrite, progress=progress)
    _report(result, [name or Path(matrix).stem], as_json)


def _report(store: WeightsStore, names: list[str], as_json: bool) -> None:
    if as_json:
        echo_json({"store": store.url, "tensors": {n: store.info(n) for n in names}})
        return
    click.echo(format_extract(store, names))


commands = [extract_cmd, tile_cmd]
