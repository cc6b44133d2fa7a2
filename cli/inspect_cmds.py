"""``prismoe inspect``, ``prismoe compare`` and ``prismoe visualize``: look at stores and matrices."""

from __future__ import annotations

import json

import click

from cli.progress import bar, quiet_option
from prismoe_store.inspect import compare_matrices, inspect_store, open_matrix, open_tensor


@click.command("inspect")
@click.argument("store")
@click.option("--tensor", "-t", default=None, help="Inspect only this tensor (default: every tensor).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, with the per-tile statistics arrays.")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None,
              help="Write PNG heatmaps of the tile norms into this folder.")
@click.option("--no-stats", is_flag=True, help="Metadata only: do not read the tiles.")
@quiet_option
def inspect_cmd(store, tensor, as_json, plot_dir, no_stats, quiet):
    """Show a store's grid, shapes, dtype, bytes, codecs and per-tile statistics.

    STORE is a store folder or fsspec URL. The statistics (Frobenius norm, mean, std, absmax,
    share of zeros of each tile) are computed tile by tile, never holding the whole matrix.
    """
    if plot_dir is not None and no_stats:
        raise click.UsageError("--plot draws the tile statistics: it cannot go with --no-stats")
    with bar("inspect", quiet=quiet, unit="tile") as progress:
        report = inspect_store(store, tensor=tensor, stats=not no_stats, progress=progress)
    written = []
    if plot_dir is not None:
        from prismoe_store.plots import report_heatmaps

        written = [str(p) for p in report_heatmaps(report, plot_dir)]
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "plots": written}))
        return
    click.echo(report.text())
    for p in written:
        click.echo(f"wrote {p}")


@click.command("compare")
@click.argument("a")
@click.argument("b")
@click.option("--tensor", "-t", default=None,
              help="Tensor of A (name or alias such as lm_head); also B's unless --tensor-b is given.")
@click.option("--tensor-b", default=None,
              help="Tensor of B (default: --tensor, else A's tensor name when B holds several).")
@click.option("--atol", type=float, default=0.0, show_default=True,
              help="Succeed (exit 0) only when max |A - B| <= ATOL.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@quiet_option
def compare_cmd(a, b, tensor, tensor_b, atol, as_json, quiet):
    """Compare matrix A with reference B: max abs diff, relative Frobenius error, cosine.

    A and B are each a weights store (the tensor name may be left out when it holds one) or a
    checkpoint file (.safetensors, HF folder, .pt/.bin, .gguf, .npy). Both are streamed block by
    block. Exits 1 with a one-line message when max |A - B| exceeds --atol.
    """
    ma = open_matrix(a, tensor=tensor)
    mb = open_matrix(b, tensor=tensor_b or tensor, fallback=ma.name)
    with bar("compare", quiet=quiet, unit="block") as progress:
        c = compare_matrices(ma.array, mb.array, progress=progress)
    ok = c.within(atol)
    if as_json:
        click.echo(json.dumps({"a": ma.label, "b": mb.label, **c.to_dict(), "atol": atol, "within_atol": ok}))
    else:
        click.echo(f"A: {ma.label}\nB: {mb.label}\nshape {c.shape[0]} × {c.shape[1]}")
        click.echo(f"max abs diff             {c.max_abs_diff:.6g} at {c.argmax}")
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
