"""``prismoe inspect``, ``prismoe compare`` and ``prismoe visualize``: look at stores and matrices.

``prismoe inspect ADAPTER --routing PAIRS`` adds the routing report of ``prismoe routing``
(:func:`prismoe_store.gates.report.routing_report`, rendered by :func:`cli.gates_cmds.format_routing`).
"""

from __future__ import annotations

import click

from cli.options import json_option, plot_dir_option
from cli.output import echo_json
from cli.progress import bar, quiet_option
from prismoe_store.inspection.common import inspect_store, store_format
from prismoe_store.inspection.compare import compare_matrices, open_matrix, open_tensor


@click.command("inspect")
@click.argument("store")
@click.option("--tensor", "-t", default=None,
              help="Inspect only this item: a weights store's tensor, x or z of a pairs store, pipe1.. of an adapter.")
@json_option("Print one JSON object, with the per-tile / per-column arrays.")
@plot_dir_option("--plot",
                 help="Write PNGs into this folder: tile-norm heatmaps (weights, adapter pipes), column profiles and "
                      "row-block heatmaps (pairs), routing plots (with --routing).")
@click.option("--no-stats", is_flag=True, help="Metadata only: do not read the tiles or rows.")
@click.option("--routing", "routing_pairs", default=None, metavar="PAIRS",
              help="Adapter only: also report the routing statistics and held-out quality of its trained gates "
                   "on this pairs store (as `prismoe routing`).")
@click.option("--sparsity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --routing: ρ for the statistics (default: the one the gates were trained with).")
@quiet_option
def inspect_cmd(store, tensor, as_json, plot_dir, no_stats, routing_pairs, sparsity, quiet):
    """Show a store's layout, bytes, codecs and streamed statistics (weights, pairs or adapter).

    STORE is a store folder or fsspec URL; its format decides the report. Weights: grid, shapes,
    dtype and per-tile statistics (Frobenius norm, mean, std, absmax, share of zeros). Pairs: rows,
    widths, chunks, provenance and per-column mean/std/non-finite share of x and z over the
    committed rows. Adapter: mode, alphas, fit settings and held-out metrics, gate settings, and per
    pipe its grid, fp32/INT8 bytes, gate and per-tile norms. Statistics are streamed block by block
    or tile by tile, never holding a whole matrix.
    """
    fmt = store_format(store)
    if routing_pairs is not None and fmt != "adapter":
        raise click.UsageError(f"--routing needs an adapter store; {store} is a {fmt} store")
    if sparsity is not None and routing_pairs is None:
        raise click.UsageError("--sparsity goes with --routing")
    if plot_dir is not None and no_stats and routing_pairs is None:
        raise click.UsageError("--plot draws the statistics: it cannot go with --no-stats")
    with bar("inspect", quiet=quiet, unit="block" if fmt == "pairs" else "tile") as progress:
        report = inspect_store(store, tensor=tensor, stats=not no_stats, progress=progress)
    written = [str(p) for p in report.plot(plot_dir)] if plot_dir is not None and not no_stats else []
    routing = _routing(store, routing_pairs, sparsity, plot_dir, quiet) if routing_pairs is not None else None
    if as_json:
        out = {**report.to_dict(), "plots": written}
        if routing is not None:
            out["routing"] = routing
        echo_json(out)
        return
    click.echo(report.text())
    if routing is not None:
        from prismoe_store.gates.report import format_routing

        click.echo("")
        click.echo(format_routing(routing))
    for p in written + (routing or {}).get("plots", []):
        click.echo(f"wrote {p}")


def _routing(adapter: str, pairs: str, sparsity, plot_dir, quiet: bool) -> dict:
    """The routing report ``prismoe routing ADAPTER PAIRS`` makes (statistics and quality), with its plots."""
    from prismoe_store.gates import report as R

    with bar("routing", quiet=quiet, unit="row") as progress:
        report = R.routing_report(adapter, pairs, sparsity=sparsity, progress=progress)
    if plot_dir is not None:
        report["plots"] = R.plot_routing(report, plot_dir)
        if "quality" in report:
            report["plots"].append(R.plot_quality(report["quality"], plot_dir))
    return report


@click.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--tensor", "-t", default=None,
              help="Tensor of A (name or alias such as lm_head); also B's unless --tensor-b is given.")
@click.option("--tensor-b", default=None,
              help="Tensor of B (default: --tensor, else A's tensor name when B holds several).")
@click.option("--atol", type=float, default=0.0, show_default=True,
              help="Succeed (exit 0) only when max |A - B| <= ATOL.")
@click.option("--int8", "int8", is_flag=True,
              help="A is an adapter store: use its INT8 tiles (after `prismoe quantize`), dequantized, instead of "
                   "its float32 ones; B's are float32 (`compare ADAPTER ADAPTER --int8` shows the INT8 error).")
@json_option()
@quiet_option
def compare_cmd(a, b, tensor, tensor_b, atol, int8, as_json, quiet):
    """Compare matrix A with reference B: max abs diff, relative Frobenius error, cosine.

    A and B are each a weights store (the tensor name may be left out when it holds one), a
    checkpoint file (.safetensors, HF folder, .pt/.bin, .gguf, .npy), or an adapter store, which
    stands for the matrix it computes with every tile (a head adapter: its rows in token order;
    --tensor then names only the other side's tensor). Both are streamed block by block. Exits 1
    with a one-line message when max |A - B| exceeds --atol.

    Example: `prismoe compare head.zarr model.gguf --tensor lm_head` checks that a head adapter
    holds the model's head exactly (max abs diff 0).
    """
    ma = open_matrix(a, tensor=tensor, int8=int8)
    mb = open_matrix(b, tensor=tensor_b or tensor, fallback=ma.name or None)
    with bar("compare", quiet=quiet, unit="block") as progress:
        c = compare_matrices(ma.array, mb.array, progress=progress)
    ok = c.within(atol)
    if as_json:
        echo_json({"a": ma.label, "b": mb.label, **c.to_dict(), "atol": atol, "within_atol": ok})
    else:
        click.echo(f"A: {ma.label}" + (f"   ({ma.note})" if ma.note else ""))
        click.echo(f"B: {mb.label}" + (f"   ({mb.note})" if mb.note else ""))
        click.echo(f"shape {c.shape[0]} × {c.shape[1]}")
        click.echo(f"max abs diff             {c.max_abs_diff:.6g}" + (f" at {c.argmax}" if c.max_abs_diff else ""))
        click.echo(f"relative Frobenius error {c.rel_frobenius:.6g}  (‖A−B‖/‖B‖)")
        click.echo(f"cosine similarity        {c.cosine:.9f}")
    if not ok:
        raise click.ClickException(f"max abs diff {c.max_abs_diff:.6g} exceeds --atol {atol:g}")


@click.command("visualize")
@click.argument("tensor_file")
@click.option("-o", "--output-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the PNG files (created if missing).")
@click.option("--prefix", default=None, help="File name prefix (default: the tensor's name).")
@click.option("--tensor", "-t", default=None, help="Tensor to show from a state dict or a store.")
@click.option("--max-slices", type=click.IntRange(min=1), default=16, show_default=True,
              help="Slices (along axis 0) drawn as heatmaps, evenly spaced.")
@click.option("--hist-slices", type=click.IntRange(min=1), default=64, show_default=True,
              help="Slices whose values make the histogram, evenly spaced.")
@click.option("--max-pixels", type=click.IntRange(min=8), default=256, show_default=True,
              help="Largest image side; bigger slices show the RMS of each block.")
@quiet_option
def visualize_cmd(tensor_file, output_dir, prefix, tensor, max_slices, hist_slices, max_pixels, quiet):
    """Draw a 2-D or 3-D tensor: slice heatmaps and a value histogram (PNG).

    TENSOR_FILE is a .npy or .pt/.pth/.bin file, or a weights store, whose tensor is viewed as its
    stack of tiles (workers × tile_out × tile_in; padding shows as zeros).
    """
    from prismoe_store.plots import safe_name, visualize_tensor

    opened = open_tensor(tensor_file, tensor=tensor)
    unit = getattr(opened.array, "unit", "slice")  # a store's tile stack names its tiles
    with bar("visualize", quiet=quiet, unit=unit) as progress:
        paths = visualize_tensor(opened.array, output_dir, prefix=prefix or safe_name(opened.name),
                                 max_slices=max_slices, hist_slices=hist_slices, max_pixels=max_pixels,
                                 title=opened.label, unit=unit, slice_name=getattr(opened.array, "name", None),
                                 progress=progress)
    for p in paths:
        click.echo(f"wrote {p}")


commands = [inspect_cmd, compare_cmd, visualize_cmd]
