"""``prismoe head`` (a head adapter straight from a matrix) and ``prismoe benchmark head``."""

from __future__ import annotations

import os

import click

from cli.output import echo_json, note_input_layer, open_adapter, output_store
from cli.progress import bar, quiet_option

_ORDERS = ("cluster", "identity")  # prismoe_store.head.vocab_order.ORDERS (not imported: it loads numpy)


def _stages(quiet: bool):
    """A ``stage(name)`` factory: one progress bar per stage (none when quiet)."""
    return lambda name: bar(name, quiet=quiet, unit="step")


def _floats(value: str, low: float, high: float) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    if any(not low < v <= high for v in out):
        raise click.BadParameter(f"each value must be in ({low}, {high}], got {value!r}")
    return out


@click.command("head")
@click.argument("source")
@click.option("-o", "--output", required=True, callback=output_store, help="Head adapter store to write (path or URL).")
@click.option("--tensor", default="lm_head", show_default=True,
              help="Tensor name or alias (lm_head, embedding) in a checkpoint or weights store.")
@click.option("--bands", type=click.IntRange(min=1), default=None,
              help="About how many bands (sets the band height, a power of 2) [default: bands of 64 rows].")
@click.option("--band-rows", type=click.IntRange(min=1), default=None, help="Rows per band (a power of 2).")
@click.option("--order", type=click.Choice(_ORDERS), default="cluster", show_default=True,
              help="cluster: bands of tokens that win together (balanced k-means); identity: token-id order.")
@click.option("--iterations", type=click.IntRange(min=0), default=6, show_default=True,
              help="Balanced k-means rounds of the cluster order.")
@click.option("--hidden", default=None,
              help="Hidden states of the model (pairs store from `collect --target none`, or .npy): the cluster "
                   "order then groups tokens whose logits move together over them (much better bands).")
@click.option("--hidden-rows", type=click.IntRange(min=1), default=65536, show_default=True,
              help="At most this many hidden-state rows for --hidden.")
@click.option("--int8", is_flag=True, help="Also write INT8 tiles with per-row scales.")
@click.option("--compressor", type=click.Choice(["none", "zstd", "blosc"]), default="zstd", show_default=True,
              help="Chunk codec of the adapter.")
@click.option("--scratch-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the float32 scratch copy of the matrix [default: the temp dir].")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def head_cmd(source, output, tensor, bands, band_rows, order, iterations, hidden, hidden_rows, int8, compressor,
             scratch_dir, overwrite, as_json, quiet):
    """Build a sparse head adapter from SOURCE's matrix: band tiles, a vocabulary order, a centroid gate.

    SOURCE is any checkpoint `extract` reads (file or folder), a .npy, a weights store, or an
    adapter store (its combined matrix). No pairs and no fit are needed; train the gate
    afterwards with `prismoe fit-gates OUTPUT HIDDEN`. Re-running after an interruption finishes
    the bands not yet written; re-running after it finished does nothing (other settings are refused
    without --overwrite).
    """
    from prismoe_store.head.build import HeadConfig, build_head
    from prismoe_store.head.vocab_order import OrderConfig
    from prismoe_store.stores import StoreOptions

    config = HeadConfig(tensor=tensor, bands=bands, band_rows=band_rows, int8=int8,
                        order=OrderConfig(method=order, iterations=iterations),
                        options=StoreOptions(compressor=compressor), scratch_dir=scratch_dir, hidden=hidden,
                        hidden_rows=hidden_rows)
    note_input_layer(hidden)
    r = build_head(source, output, config=config, overwrite=overwrite, stages=_stages(quiet or as_json))
    if as_json:
        echo_json(r.to_dict())
        return
    click.echo(r.text())


@click.command("head")
@click.argument("adapter")
@click.argument("hidden")
@click.option("--sparsities", default="0.02,0.05,0.1,0.2,0.3", show_default=True,
              help="Comma-separated ρ: share of bands per token.")
@click.option("--masses", default="0.9,0.95,0.99", show_default=True,
              help="Comma-separated mass thresholds m (fewest bands whose predicted mass reaches m).")
@click.option("--mass-cap", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Most bands a token may take under a mass threshold [default: 0.25].")
@click.option("--max-rows", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Held-out rows used.")
@click.option("--int8", is_flag=True,
              help="Compute the selected bands with the INT8 tiles: top-1 agreement is then against the float32 "
                   "head (it counts the INT8 error); the other columns are the routing's.")
@click.option("--no-baselines", is_flag=True, help="Skip the contiguous-order and truncated-SVD baselines.")
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the tables here.")
@click.option("--plots", "plot_dir", type=click.Path(file_okay=False), default=None,
              help="Write head_top1.png (top-1 against rows computed) here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def bench_head_cmd(adapter, hidden, sparsities, masses, mass_cap, max_rows, int8, no_baselines, markdown, plot_dir,
                   as_json, quiet):
    """Quality of a head adapter on held-out HIDDEN states: top-1, top-5, mass, KL, rows and bytes per token."""
    from prismoe_store.bench.head import benchmark_head, format_head_report, plot_head

    store = open_adapter(adapter, hidden, require_complete=True)
    note_input_layer(hidden, store)
    with bar("benchmark head", quiet=quiet or as_json, unit="row") as progress:
        r = benchmark_head(store, hidden, sparsities=_floats(sparsities, 0, 1), masses=_floats(masses, 0, 1),
                           mass_cap=mass_cap, max_rows=max_rows, baselines=not no_baselines,
                           quant="int8" if int8 else None, progress=progress)
    text = format_head_report(r)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text + "\n")
    if plot_dir:
        r["plots"] = [plot_head(r, os.path.join(plot_dir, "head_top1.png"))]
    if as_json:
        echo_json(r)
        return
    click.echo(text)
    for path in r.get("plots", []):
        click.echo(f"wrote {path}")


commands = [head_cmd]
bench_commands = [bench_head_cmd]
