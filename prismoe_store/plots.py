"""PNG plots: tile-norm heatmaps over a grid, per-column profiles of a pairs store, and slice
views of 2-D/3-D tensors.

Matplotlib is imported only when a plot is drawn, and draws through its Agg canvas on a private
``Figure`` (no pyplot, no global backend switch). Big tensors are never read whole: images are
reduced band by band to at most ``max_pixels`` per side (as the root mean square of each block,
said so on the plot), and the value histogram reads a bounded sample of slices.

>>> import os, tempfile
>>> import numpy as np
>>> out = tempfile.mkdtemp()
>>> p = tile_heatmap(np.arange(8.0).reshape(2, 4), os.path.join(out, "h.png"), title="norms")
>>> os.path.getsize(p) > 0
True
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

BAND_BYTES = 16 << 20  # float64 bytes read at a time while reducing an image or histogramming


def figure(width: float, height: float, *, dpi: int = 100):
    """A matplotlib ``Figure`` on the Agg canvas (no display, no pyplot state), sized in inches.

    >>> figure(2, 1).get_size_inches().tolist()
    [2.0, 1.0]
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def safe_name(text: str) -> str:
    """A file-name-safe version of a tensor name or title.

    >>> safe_name("model/lm_head.weight tile norms")
    'model_lm_head.weight_tile_norms'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "plot"


# -- heatmaps of per-tile values -------------------------------------------------------------


def tile_heatmap(values: np.ndarray, path, *, mask: np.ndarray | None = None, title: str = "",
                 label: str = "Frobenius norm") -> Path:
    """Draw a ``(rows, cols)`` array of per-tile values as a heatmap PNG; masked cells grey.

    Cells are annotated with their values when the grid is small (≤ 64 cells).

    >>> import tempfile, os
    >>> p = tile_heatmap(np.ones((2, 2)), os.path.join(tempfile.mkdtemp(), "x.png"),
    ...                  mask=np.array([[False, True], [False, False]]))
    >>> p.suffix
    '.png'
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"tile_heatmap needs a (rows, cols) array, got shape {values.shape}")
    rows, cols = values.shape
    shown = np.ma.masked_array(values, mask=mask if mask is not None else np.zeros_like(values, bool))
    shown = np.ma.masked_invalid(shown)
    width = min(14.0, max(4.5, 2.5 + 0.3 * cols))
    height = min(12.0, max(3.0, 1.5 + 0.25 * rows))
    fig = figure(width, height)
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    im = ax.imshow(shown, cmap=cmap, aspect="auto", interpolation="nearest",
                   extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
    fig.colorbar(im, ax=ax, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # grid indices only
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("col c (input slice)")
    ax.set_ylabel("row r (output band)")
    n_pad = int(np.ma.getmaskarray(shown).sum())
    ax.set_title(f"{title}\n{rows}×{cols} grid" + (f", grey: {n_pad} padding-only" if n_pad else ""), fontsize=10)
    if rows * cols <= 64:
        lo, hi = im.get_clim()
        for r in range(rows):
            for c in range(cols):
                if not np.ma.getmaskarray(shown)[r, c]:
                    bright = (values[r, c] - lo) > 0.6 * (hi - lo)  # viridis is light at the top
                    ax.text(c, r, f"{values[r, c]:.3g}", ha="center", va="center", fontsize=7,
                            color="black" if bright else "white")
    return _save(fig, path)


def report_heatmaps(report, out_dir) -> list[Path]:
    """Write every heatmap a store report offers (``report.heatmaps()``) as ``<title>.png``."""
    out = []
    for title, (values, mask) in report.heatmaps().items():
        out.append(tile_heatmap(values, Path(out_dir) / f"{safe_name(title)}.png", mask=mask, title=title))
    return out


# -- pairs stores: per-column profiles and block heatmaps ------------------------------------

PROFILE_POINTS = 1024  # most points per profile line; wider arrays show each bin's min..max band


def pairs_plots(report, out_dir) -> list[Path]:
    """Draw a pairs report's column statistics (``report.stats``: name -> ColumnStats):
    ``pairs_columns.png`` (mean and std of each column, and the non-finite share when there are
    any) and ``pairs_blocks.png`` (RMS of each block of rows × columns: drift along the rows).

    >>> import tempfile
    >>> from types import SimpleNamespace
    >>> from prismoe_store.inspection.pairs import column_stats
    >>> rng = np.random.default_rng(0)
    >>> rep = SimpleNamespace(url="demo", stats={"x": column_stats(rng.normal(size=(50, 6)))})
    >>> [p.name for p in pairs_plots(rep, tempfile.mkdtemp())]
    ['pairs_columns.png', 'pairs_blocks.png']
    """
    out = Path(out_dir)
    stats = dict(report.stats)
    return [_columns_png(stats, report.url, out / "pairs_columns.png"),
            _blocks_png(stats, report.url, out / "pairs_blocks.png")]


def _envelope(values: np.ndarray, points: int = PROFILE_POINTS):
    """``(x, lo, hi)``: the values themselves when few, else the min and max of each of ``points``
    bins of columns (NaN where a bin has no finite value)."""
    n = len(values)
    if n <= points:
        x = np.arange(n)
        return x, values, values
    edges = np.linspace(0, n, points + 1).astype(int)
    fin = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins
        lo = np.array([np.nanmin(fin[a:b]) for a, b in zip(edges[:-1], edges[1:])])
        hi = np.array([np.nanmax(fin[a:b]) for a, b in zip(edges[:-1], edges[1:])])
    return (edges[:-1] + edges[1:] - 1) / 2, lo, hi


def _profile(ax, values: np.ndarray, color: str, label: str) -> None:
    x, lo, hi = _envelope(np.asarray(values, np.float64))
    if lo is hi:
        ax.plot(x, lo, color=color, lw=1, marker="." if len(x) <= 64 else None, label=label)
    else:
        ax.fill_between(x, lo, hi, color=color, alpha=0.35, lw=0, step="mid", label=f"{label} (min…max per bin)")
        ax.plot(x, (lo + hi) / 2, color=color, lw=0.6)
    ax.set_xlabel("column")
    ax.grid(alpha=0.3)


def _columns_png(stats: dict, url: str, path) -> Path:
    any_bad = any(int(s.nonfinite.sum()) for s in stats.values())
    ncols = 3 if any_bad else 2
    fig = figure(4.6 * ncols, 3.2 * len(stats) + 0.8)
    axes = fig.subplots(len(stats), ncols, squeeze=False)
    for row, (name, s) in zip(axes, stats.items()):
        m = s.summary()
        _profile(row[0], s.mean, "C0", "mean")
        row[0].axhline(0, color="k", lw=0.5)
        row[0].set_ylabel(f"{name}: mean per column")
        _profile(row[1], s.std, "C1", "std")
        live = s.std[np.isfinite(s.std) & (s.std > 0)]
        if live.size and live.max() > 100 * live.min():
            row[1].set_yscale("log")
        row[1].set_ylabel(f"{name}: std per column")
        if m["values"]:
            row[1].set_title(f"{name}: std {m['std']:.3g} overall; column std {m['col_std_min']:.3g} … "
                             f"{m['col_std_max']:.3g}, {m['constant_columns']} constant", fontsize=9)
        if any_bad:
            _profile(row[2], s.nonfinite_share, "C3", "non-finite share")
            row[2].set_ylabel(f"{name}: non-finite share")
            row[2].set_title(f"{m['nonfinite']} non-finite values in {m['nonfinite_columns']} column(s)", fontsize=9)
        for ax in row:
            if len(s.mean) > PROFILE_POINTS:
                ax.legend(fontsize=7, loc="upper right")
    rows = next(iter(stats.values())).rows
    fig.suptitle(f"{url}: per-column statistics over {rows} rows (finite values)", fontsize=10)
    return _save(fig, path)


def _blocks_png(stats: dict, url: str, path) -> Path:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    fig = figure(5.2 * len(stats), 4.6)
    axes = fig.subplots(1, len(stats), squeeze=False)[0]
    for ax, (name, s) in zip(axes, stats.items()):
        img = np.ma.masked_invalid(s.block_rms)
        vals = img.compressed()
        vmin, vmax = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
        vmax = vmax if vmax > vmin else vmin + 1.0
        log = vmin > 0 and vmax > 10 * vmin  # a wide range (an outlier feature): log colours show the rest
        norm = matplotlib.colors.LogNorm(vmin, vmax) if log else matplotlib.colors.Normalize(vmin, vmax)
        if img.size == 0:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        else:  # bins may differ in size: draw each on its true row and column edges
            im = ax.pcolormesh(s.col_edges, s.row_edges, img, cmap=cmap, norm=norm)
            ax.set_ylim(s.row_edges[-1], 0)
            fig.colorbar(im, ax=ax, label="RMS of block" + (" (log scale)" if log else ""))
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        ax.set_title(f"{name}: {img.shape[0]} row bins × {img.shape[1]} column bins", fontsize=9)
    fig.suptitle(f"{url}: root mean square of each block of rows × columns\n"
                 "(colours span the 1st–99th percentile; grey: no finite value)", fontsize=10)
    return _save(fig, path)


# -- 2-D / 3-D tensors -------------------------------------------------------------------------


def visualize_tensor(array, out_dir, *, prefix: str = "tensor", max_slices: int = 16, max_pixels: int = 256,
                     hist_slices: int = 64, bins: int = 100, title: str = "", unit: str = "slice",
                     slice_name: Callable[[int], str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Write slice heatmaps and a value histogram of a 2-D or 3-D array; return the PNG paths.

    ``array`` is anything sliced like NumPy (``a[i, r0:r1]`` for 3-D, ``a[r0:r1]`` for 2-D): a
    memory map, a Zarr array, a store's tile stack. Writes ``<prefix>_slices.png`` (up to
    ``max_slices`` evenly spaced slices along axis 0, shared colour scale) and
    ``<prefix>_hist.png`` (values of up to ``hist_slices`` slices, and for 3-D the Frobenius norm of
    each of those slices). ``unit`` names what a slice is ("tile" for a tile stack) and
    ``slice_name(i)`` titles slice ``i``. ``progress(done, total)`` counts slice reads.

    >>> import tempfile
    >>> paths = visualize_tensor(np.random.default_rng(0).normal(size=(4, 8, 8)), tempfile.mkdtemp())
    >>> [p.name for p in paths]
    ['tensor_slices.png', 'tensor_hist.png']
    """
    shape = tuple(array.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"visualize_tensor needs a 2-D or 3-D array, got shape {shape}")
    view = _Slices(array)
    n = view.n
    title = title or f"{prefix} {'×'.join(map(str, shape))}"
    out_dir = Path(out_dir)

    picks, hist_picks = _evenly(n, max_slices), _evenly(n, hist_slices)
    tick = _ticker(progress, len(picks) + 2 * len(hist_picks))
    ranges: dict[int, tuple[float, float]] = {}  # value range of each slice read so far
    images = [tick(_reduced(view, i, max_pixels, ranges)) for i in picks]
    rms = images[0][1] > 1 or images[0][2] > 1
    names = slice_name or (lambda i: f"{unit} {i}")
    paths = [_slices_png(images, picks, view, rms, title, unit, names, out_dir / f"{prefix}_slices.png")]
    paths.append(_hist_png(view, hist_picks, ranges, bins, title, unit, out_dir / f"{prefix}_hist.png", tick))
    return paths


def _ticker(progress, total: int):
    """A pass-through function that reports one more unit done each time it is called."""
    done = [0]

    def tick(value=None):
        done[0] += 1
        if progress is not None:
            progress(done[0], total)
        return value

    return tick


class _Slices:
    """Uniform access to slice ``i``'s rows ``r0:r1`` of a 2-D (one slice) or 3-D array."""

    def __init__(self, array):
        self.array = array  # the 2-D or 3-D array-like
        shape = tuple(array.shape)
        self.three_d = len(shape) == 3  # False: a 2-D array seen as one slice
        self.n, self.h, self.w = shape if self.three_d else (1, *shape)

    def rows(self, i: int, r0: int, r1: int) -> np.ndarray:
        part = self.array[i, r0:r1] if self.three_d else self.array[r0:r1]
        return np.asarray(part, dtype=np.float64)

    def valid_shape(self, i: int) -> tuple[int, int]:
        """Rows and columns of slice ``i`` that are data, not padding (all, unless the array says)."""
        return self.array.valid_shape(i) if hasattr(self.array, "valid_shape") else (self.h, self.w)

    def bands(self, i: int, multiple: int = 1, *, valid_only: bool = False):
        """Yield ``(r0, rows)`` bands of slice ``i``; ``valid_only`` drops an array's padding
        (when it says where that is, via ``valid_shape(i)``, like a store's tile stack)."""
        h, w = self.valid_shape(i) if valid_only else (self.h, self.w)
        step = max(multiple, (BAND_BYTES // (8 * max(1, self.w))) // multiple * multiple)
        for r0 in range(0, h, step):
            yield r0, self.rows(i, r0, min(r0 + step, h))[:, :w]


def _evenly(n: int, k: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, max(1, k)))})


def _reduced(view: _Slices, i: int, max_pixels: int, ranges: dict) -> tuple[np.ndarray, int, int]:
    """Slice ``i`` as an image of at most ``max_pixels`` per side: the values themselves when it
    fits, else the root mean square of each ``fr × fc`` block. Returns (image, fr, fc), and
    records the slice's value range (padding left out) in ``ranges[i]``."""
    fr, fc = -(-view.h // max_pixels), -(-view.w // max_pixels)
    vh, vw = view.valid_shape(i)
    if fr == 1 and fc == 1:
        img = view.rows(i, 0, view.h)
        ranges[i] = _range(img[:vh, :vw])
        return img, 1, 1
    col_starts = np.arange(0, view.w, fc)
    col_counts = np.diff(np.append(col_starts, view.w))
    out = np.zeros((-(-view.h // fr), len(col_starts)))
    for r0, band in view.bands(i, multiple=fr):
        row_starts = np.arange(0, band.shape[0], fr)
        row_counts = np.diff(np.append(row_starts, band.shape[0]))
        sq = np.add.reduceat(np.add.reduceat(band * band, row_starts, axis=0), col_starts, axis=1)
        out[r0 // fr:r0 // fr + len(row_starts)] = sq / np.outer(row_counts, col_counts)
        ranges[i] = _range(band[:max(0, vh - r0), :vw], ranges.get(i))
    return np.sqrt(out), fr, fc


def _range(values: np.ndarray, prev: tuple[float, float] | None = None) -> tuple[float, float]:
    """(min, max) of the finite values, merged with ``prev``; (inf, -inf) when there are none."""
    lo, hi = prev or (math.inf, -math.inf)
    f = values[np.isfinite(values)]
    if f.size:
        lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
    return lo, hi


def _slices_png(images, picks, view: _Slices, rms: bool, title: str, unit: str, names, path) -> Path:
    import matplotlib

    k = len(images)
    ncols = math.ceil(math.sqrt(k))
    nrows = math.ceil(k / ncols)
    fig = figure(min(16.0, max(7.0, 2.0 + 3.2 * ncols)), min(16.0, 1.6 + 3.0 * nrows))
    finite = np.concatenate([img[np.isfinite(img)].ravel() for img, _, _ in images])
    if rms:  # block RMS values crowd together: spread the colours over their own range
        vmin, vmax = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
        vmax = vmax if vmax > vmin else vmin + 1.0
        cmap, label, clip = matplotlib.colormaps["viridis"], "RMS of block", "0.5th–99.5th percentile"
    else:
        top = float(np.percentile(np.abs(finite), 99.5)) if finite.size else 1.0
        vmin, vmax = (-top, top) if top > 0 else (-1.0, 1.0)
        cmap, label, clip = matplotlib.colormaps["RdBu_r"], "value", "±99.5th percentile of |value|"
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for ax, (img, _fr, _fc), i in zip(axes.ravel(), images, picks):
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest",
                       extent=(0, view.w, view.h, 0))
        ax.set_title(names(i) if view.three_d else "matrix", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[k:]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes.ravel().tolist(), label=label, shrink=0.8)
    _, fr, fc = images[0]
    note = f"each pixel the RMS of a {fr}×{fc} block; " if rms else ""
    shown = f"{k} of {view.n} {unit}s along axis 0" if view.three_d else f"{view.h}×{view.w} matrix"
    fig.suptitle(f"{title}\n{shown}\n{note}colours span the {clip}", fontsize=10)
    return _save(fig, path)


def _hist_png(view: _Slices, picks: list[int], ranges: dict, bins: int, title: str, unit: str, path,
              tick) -> Path:
    lo, hi = math.inf, -math.inf
    for i in picks:  # pass 1: the value range (already known for the slices drawn as images)
        if i not in ranges:
            for _, band in view.bands(i, valid_only=True):
                ranges[i] = _range(band, ranges.get(i))
        lo, hi = min(lo, ranges.get(i, (lo, hi))[0]), max(hi, ranges.get(i, (lo, hi))[1])
        tick()
    if not math.isfinite(lo):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = np.zeros(bins, np.int64)
    edges = np.linspace(lo, hi, bins + 1)
    n = zeros = nonfinite = 0
    s = ss = 0.0
    norms = []
    for i in picks:  # pass 2: the histogram and moments
        sq = 0.0
        for _, band in view.bands(i, valid_only=True):
            counts += np.histogram(band, bins=edges)[0]
            fin = np.isfinite(band)
            nonfinite += int(band.size - fin.sum())
            f = band[fin]
            n, zeros = n + f.size, zeros + int(f.size - np.count_nonzero(f))
            s, ss, sq = s + float(f.sum()), ss + float(f @ f), sq + float(f @ f)
        norms.append(math.sqrt(sq))
        tick()
    mean = s / max(n, 1)
    std = math.sqrt(max(ss / max(n, 1) - mean * mean, 0.0))

    fig = figure(11.0 if view.three_d else 7.0, 4.2)
    axes = fig.subplots(1, 2 if view.three_d else 1, squeeze=False).ravel()
    ax = axes[0]
    ax.stairs(counts, edges, fill=True, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    sampled = f" (from {len(picks)} of {view.n} {unit}s)" if len(picks) < view.n else ""
    if hasattr(view.array, "valid_shape"):
        sampled += ", padding left out"
    ax.set_title(f"value histogram{sampled}\nmean {mean:.3g}, std {std:.3g}, zeros {100 * zeros / max(n, 1):.2f}%"
                 + (f", non-finite {nonfinite}" if nonfinite else ""), fontsize=9)
    if view.three_d:
        ax2 = axes[1]
        ax2.plot(picks, norms, marker="o" if len(picks) <= 64 else None, lw=1)
        ax2.set_xlabel(f"{unit} index (axis 0)")
        ax2.set_ylabel("Frobenius norm")
        ax2.set_title(f"norm of each {unit}" + (" (sampled)" if sampled else ""), fontsize=9)
        ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)

