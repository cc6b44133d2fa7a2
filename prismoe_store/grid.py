"""The rigid power-of-2 grid: which worker owns which tile, input slice and output band.

A pipe is a grid of ``rows × cols`` workers. Worker ``j = r * cols + c`` owns tile ``T_j`` of
shape ``(tile_out, tile_in)``; it reads the input slice ``x[c*tile_in:(c+1)*tile_in]`` and writes
the output band ``y[r*tile_out:(r+1)*tile_out]``. The grid covers a padded matrix of shape
``(d_out_pad, d_in_pad) = (rows*tile_out, cols*tile_in)``; the true matrix ``(d_out, d_in)`` sits
in its top-left corner, the rest is zero padding.

>>> from prismoe_store.grid import plan_grid
>>> g = plan_grid(4096, 128256)
>>> (g.rows, g.cols, g.tile_out, g.tile_in)
(16, 32, 8192, 128)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from prismoe_store.errors import GridError

Layout = Literal["balanced", "wide"]
DEFAULT_WORKERS = 512


def is_pow2(n: int) -> bool:
    """True when ``n`` is a positive power of two (1 counts).

    >>> is_pow2(512), is_pow2(384)
    (True, False)
    """
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``).

    >>> next_pow2(501), next_pow2(512)
    (512, 512)
    """
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class GridSpec:
    """One pipe's grid: rows × cols workers over a padded ``(d_out, d_in)`` matrix.

    >>> g = GridSpec(d_in=6, d_out=10, rows=4, cols=2, tile_out=4, tile_in=4)
    >>> g.workers, g.row_col(5), g.input_slice(5), g.output_band(5)
    (8, (2, 1), slice(4, 8, None), slice(8, 12, None))
    """

    d_in: int  # M: true input width (columns of the matrix)
    d_out: int  # N: true output width (rows of the matrix)
    rows: int  # R: number of output bands, a power of 2
    cols: int  # C: number of input slices, a power of 2
    tile_out: int  # a: rows of one tile (height of an output band), a power of 2
    tile_in: int  # b: columns of one tile (width of an input slice), a power of 2

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GridError(f"{name} must be a positive integer, got {v!r}")
        for name in ("rows", "cols", "tile_out", "tile_in"):
            v = getattr(self, name)
            if name == "tile_in" and self.is_band_grid:
                continue  # band tiles span the whole, unpadded input (checked below)
            if not is_pow2(v):
                raise GridError(f"{name} must be a power of 2, got {v!r}")
        if self.cols == 1 and not is_pow2(self.tile_in) and self.tile_in != self.d_in:
            raise GridError(f"a band grid's tiles span the whole input: tile_in must be d_in = {self.d_in} "
                            f"or a power of 2, got {self.tile_in!r}")
        if self.d_out_pad < self.d_out:
            raise GridError(
                f"grid does not cover d_out: rows*tile_out = {self.rows}*{self.tile_out} "
                f"= {self.d_out_pad} < {self.d_out}"
            )
        if self.d_in_pad < self.d_in:
            raise GridError(
                f"grid does not cover d_in: cols*tile_in = {self.cols}*{self.tile_in} "
                f"= {self.d_in_pad} < {self.d_in}"
            )

    # -- sizes -------------------------------------------------------------------------------
    @property
    def is_band_grid(self) -> bool:
        """True for one column of tiles that span the whole input (``cols == 1``, ``tile_in == d_in``):
        a selected band then yields exact outputs, and the input is not padded."""
        return self.cols == 1 and self.tile_in == self.d_in

    @property
    def workers(self) -> int:
        """Number of workers (tiles), ``rows * cols``."""
        return self.rows * self.cols

    @property
    def d_in_pad(self) -> int:
        """Padded input width ``cols * tile_in``."""
        return self.cols * self.tile_in

    @property
    def d_out_pad(self) -> int:
        """Padded output width ``rows * tile_out``."""
        return self.rows * self.tile_out

    @property
    def tile_shape(self) -> tuple[int, int]:
        """``(tile_out, tile_in)``."""
        return (self.tile_out, self.tile_in)

    @property
    def padded_shape(self) -> tuple[int, int]:
        """``(d_out_pad, d_in_pad)``, the shape the tiles cover together."""
        return (self.d_out_pad, self.d_in_pad)

    @property
    def padding_fraction(self) -> float:
        """Share of the padded matrix that is padding (0 when the grid fits exactly)."""
        return 1.0 - (self.d_in * self.d_out) / (self.d_in_pad * self.d_out_pad)

    def tile_bytes(self, itemsize: int = 4) -> int:
        """Bytes of one tile at ``itemsize`` bytes per value."""
        return self.tile_out * self.tile_in * itemsize

    # -- worker <-> position -----------------------------------------------------------------
    def worker(self, row: int, col: int) -> int:
        """Worker index ``row * cols + col``."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise GridError(f"(row, col) = ({row}, {col}) is outside a {self.rows}×{self.cols} grid")
        return row * self.cols + col

    def row_col(self, worker: int) -> tuple[int, int]:
        """``(row, col)`` of a worker."""
        if not 0 <= worker < self.workers:
            raise GridError(f"worker {worker} is outside 0..{self.workers - 1}")
        return divmod(worker, self.cols)

    def input_slice(self, worker: int) -> slice:
        """The padded input columns worker ``worker`` reads."""
        c = self.row_col(worker)[1]
        return slice(c * self.tile_in, (c + 1) * self.tile_in)

    def output_band(self, worker: int) -> slice:
        """The padded output rows worker ``worker`` writes."""
        r = self.row_col(worker)[0]
        return slice(r * self.tile_out, (r + 1) * self.tile_out)

    def tile_region(self, worker: int) -> tuple[slice, slice]:
        """``(output_band, input_slice)``: where the tile sits in the padded matrix."""
        return self.output_band(worker), self.input_slice(worker)

    def valid_region(self, worker: int) -> tuple[slice, slice]:
        """Like :meth:`tile_region` but clipped to the true ``(d_out, d_in)`` matrix (may be empty)."""
        rows, cols = self.tile_region(worker)
        return (
            slice(min(rows.start, self.d_out), min(rows.stop, self.d_out)),
            slice(min(cols.start, self.d_in), min(cols.stop, self.d_in)),
        )

    def is_padding(self, worker: int) -> bool:
        """True when the worker's tile lies wholly in the padding (never selected, never loaded)."""
        rows, cols = self.tile_region(worker)
        return rows.start >= self.d_out or cols.start >= self.d_in

    def active_workers(self) -> list[int]:
        """Workers whose tile touches the true matrix, in worker order."""
        return [j for j in range(self.workers) if not self.is_padding(j)]

    @property
    def live_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the padded matrix that the tiles not wholly in padding cover (whole
        tiles up to the true matrix's last row and column); the tiles beyond are never stored. A band
        grid stores its true rows only, so its live shape is ``(d_out, d_in)``.

        >>> plan_grid(576, 576, 512).live_shape  # 64 × 32 tiles: 9 bands, 18 input slices
        (576, 576)
        """
        if self.is_band_grid:
            return (self.d_out, self.d_in)
        return (-(-self.d_out // self.tile_out) * self.tile_out, -(-self.d_in // self.tile_in) * self.tile_in)

    @property
    def active_count(self) -> int:
        """``n``: the number of workers not wholly in padding."""
        live_rows = -(-self.d_out // self.tile_out)
        live_cols = -(-self.d_in // self.tile_in)
        return live_rows * live_cols

    def iter_tiles(self) -> Iterator[tuple[int, int, int]]:
        """Yield ``(worker, row, col)`` for every worker in order."""
        for j in range(self.workers):
            r, c = divmod(j, self.cols)
            yield j, r, c

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON/Zarr attributes; :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GridSpec:
        """Build from :meth:`to_dict` output, with a clear error on missing keys."""
        try:
            return cls(**{k: int(d[k]) for k in ("d_in", "d_out", "rows", "cols", "tile_out", "tile_in")})
        except KeyError as e:
            raise GridError(f"grid description lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise GridError(f"bad grid description: {e}") from None

    def __str__(self) -> str:
        pad = "" if (self.d_in_pad, self.d_out_pad) == (self.d_in, self.d_out) else \
            f", padded {self.d_in_pad}→{self.d_out_pad}"
        return f"{self.rows}×{self.cols} grid of {self.tile_out}×{self.tile_in} tiles ({self.d_in}→{self.d_out}{pad})"


def plan_grid(
    d_in: int,
    d_out: int,
    workers: int | None = None,
    *,
    layout: Layout = "balanced",
    rows: int | None = None,
    cols: int | None = None,
    tile_out: int | None = None,
    tile_in: int | None = None,
) -> GridSpec:
    """Plan a grid of ``workers`` power-of-2 tiles covering a ``(d_out, d_in)`` matrix.

    Among all ``rows × cols = workers`` splits (powers of 2) the planner takes the one with the
    least padded area; ties go by ``layout``: ``"balanced"`` prefers a square grid (then more
    columns), ``"wide"`` prefers two input slices (tiles that read wide input slices, the seed's
    pipe 3). Any of ``rows``, ``cols``, ``tile_out``, ``tile_in`` may be fixed by the caller;
    ``rows`` and ``cols`` together fix the worker count.

    >>> g = plan_grid(4096, 128256, layout="wide")
    >>> (g.rows, g.cols, g.tile_out, g.tile_in)
    (256, 2, 512, 2048)
    >>> plan_grid(7, 3, 8).workers
    8
    """
    for name, v in (("d_in", d_in), ("d_out", d_out)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise GridError(f"{name} must be a positive integer, got {v!r}")
    if rows is not None and cols is not None:
        if workers is not None and workers != rows * cols:
            raise GridError(f"rows*cols = {rows}*{cols} = {rows * cols} but workers = {workers}")
        workers = rows * cols
    workers = DEFAULT_WORKERS if workers is None else workers
    sizes: tuple[tuple[str, int | None], ...] = (("workers", workers), ("rows", rows), ("cols", cols),
                                                  ("tile_out", tile_out), ("tile_in", tile_in))
    for name, size in sizes:
        if size is not None and not is_pow2(size):
            raise GridError(f"{name} must be a power of 2, got {size!r}")
    if layout not in ("balanced", "wide"):
        raise GridError(f"layout must be 'balanced' or 'wide', got {layout!r}")

    candidates = []
    for k in range(workers.bit_length()):
        r = 1 << k
        c = workers // r
        if (rows is not None and r != rows) or (cols is not None and c != cols):
            continue
        a = tile_out if tile_out is not None else next_pow2(-(-d_out // r))
        b = tile_in if tile_in is not None else next_pow2(-(-d_in // c))
        if r * a < d_out or c * b < d_in:
            continue
        candidates.append((r * a * c * b, _tie_break(layout, r, c), r, c, a, b))
    if not candidates:
        raise GridError(
            f"no {workers}-worker grid with rows={rows}, cols={cols}, tile_out={tile_out}, "
            f"tile_in={tile_in} covers a {d_out}×{d_in} matrix"
        )
    _, _, r, c, a, b = min(candidates)
    return GridSpec(d_in=d_in, d_out=d_out, rows=r, cols=c, tile_out=a, tile_in=b)


def _tie_break(layout: Layout, r: int, c: int) -> tuple[int, int]:
    lr, lc = r.bit_length(), c.bit_length()
    if layout == "balanced":
        return (abs(lr - lc), -c)
    return (abs(lc - 2), c)  # "wide": two input slices when possible, else as few as possible


def plan_pipes(d_in: int, d_out: int, workers: int | None = None) -> tuple[GridSpec, GridSpec, GridSpec]:
    """The three default pipe grids: pipes 1 and 2 ``balanced``, pipe 3 ``wide``.

    >>> p1, p2, p3 = plan_pipes(4096, 128256)
    >>> p1 == p2, (p3.rows, p3.cols)
    (True, (256, 2))
    """
    g = plan_grid(d_in, d_out, workers)
    return g, g, plan_grid(d_in, d_out, workers, layout="wide")


def default_band_rows(d_out: int) -> int:
    """Rows per band for a head of ``d_out`` rows: 64, or fewer for heads of under 4096 rows (so that
    even a tiny head has about 64 bands to choose from).

    >>> default_band_rows(49152), default_band_rows(1000), default_band_rows(3)
    (64, 16, 1)
    """
    return min(64, next_pow2(-(-int(d_out) // 64)))


def band_sizes(d_out: int, band_rows: int) -> np.ndarray:
    """True rows of each band ``[n]`` (int64) when ``d_out`` rows are cut into bands of ``band_rows``
    (the last band may be short).

    >>> band_sizes(10, 4).tolist()
    [4, 4, 2]
    """
    n = -(-d_out // band_rows)
    return np.minimum(band_rows, d_out - band_rows * np.arange(n, dtype=np.int64))


def plan_partition(d_in: int, d_out: int, band_rows: int | None = None) -> list[GridSpec]:
    """The ``partition`` layout of band tiles: pipes that split the output rows between them.

    Tiles are bands of ``band_rows`` (a power of 2) rows spanning the whole input (``cols = 1``,
    ``tile_in = d_in``, no input padding). Pipe 1 takes the largest power-of-2 number of whole
    bands that fits, pipe 2 the largest power-of-2 number of the rest, pipe 3 the remainder
    (any number of bands, its last one possibly short: an *edge tile* that holds only its true
    rows). Pipe ``p``'s grid describes its own rows: ``d_out`` is the rows it covers, and its
    first row is the sum of the earlier pipes' ``d_out`` (see :func:`partition_offsets`). Every
    output row is computed by exactly one tile; the tiles' true bytes equal the matrix's.

    >>> [(g.d_out, g.rows, g.tile_out, g.tile_in) for g in plan_partition(576, 49152, 64)]
    [(32768, 512, 64, 576), (16384, 256, 64, 576)]
    >>> [(g.d_out, g.rows) for g in plan_partition(384, 30522, 64)]
    [(16384, 256), (8192, 128), (5946, 128)]
    >>> [g.d_out for g in plan_partition(7, 3, 1)]
    [2, 1]
    """
    band_rows = default_band_rows(d_out) if band_rows is None else band_rows
    if not is_pow2(band_rows):
        raise GridError(f"band rows must be a power of 2, got {band_rows!r}")
    for name, v in (("d_in", d_in), ("d_out", d_out)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise GridError(f"{name} must be a positive integer, got {v!r}")
    if band_rows > d_out:
        raise GridError(f"band rows ({band_rows}) exceed the matrix's {d_out} rows: choose at most "
                        f"{1 << (d_out.bit_length() - 1)}")
    rows_left, pipes = d_out, []
    for _ in range(2):  # pipes 1 and 2: power-of-2 blocks of whole bands
        whole = rows_left // band_rows
        if whole == 0:
            break
        take = (1 << (whole.bit_length() - 1)) * band_rows
        pipes.append(take)
        rows_left -= take
    if rows_left:  # pipe 3: whatever is left, its last band possibly short
        pipes.append(rows_left)
    return [GridSpec(d_in=d_in, d_out=n, rows=next_pow2(-(-n // band_rows)), cols=1, tile_out=band_rows,
                     tile_in=d_in) for n in pipes]


def partition_offsets(grids: list[GridSpec]) -> list[int]:
    """First output row of each pipe of a ``partition`` layout (and the total at the end).

    >>> partition_offsets(plan_partition(576, 49152, 64))
    [0, 32768, 49152]
    """
    offsets = [0]
    for g in grids:
        offsets.append(offsets[-1] + g.d_out)
    return offsets


PADDING_WARN_SHARE = 0.25  # warn when more than this share of a pipe's tiles hold only padding


def padding_advice(d_in: int, d_out: int, workers: int | None = None, *,
                   threshold: float = PADDING_WARN_SHARE) -> str | None:
    """One line of advice when a pipe of the default grids (:func:`plan_pipes`) of ``workers`` tiles
    has more than ``threshold`` of its tiles wholly in padding, else ``None``.

    Such tiles are never computed, stored or loaded, but each still takes a gate row, and fewer
    tiles than asked do work. The line says how many and why (per pipe), that fewer workers do not
    remove it when they do not (a width just above a power of 2 pads at any tile size), the smaller
    count that does when there is one, and which larger count gives about
    as many working tiles as were asked for.

    >>> print(padding_advice(576, 576, 512))  # doctest: +NORMALIZE_WHITESPACE
    in each of pipes 1 and 2, 350 of its 512 tiles hold only padding (68.4%; pipe 3: 224 of 512): 576 × 576 pads
    to 1024 × 1024 on power-of-2 tiles. They are never computed or stored, but each takes a gate row, and 162 tiles
    of the pipe do work. Fewer --workers do not remove it (at --workers 128 the share is still 64.8%); it costs only
    gate rows. For about 512 working tiles a pipe use --workers 2048 (648 of pipe 1's do work)
    >>> padding_advice(64, 256, 512) is None
    True
    """
    workers = DEFAULT_WORKERS if workers is None else workers
    pipes = plan_pipes(d_in, d_out, workers)
    idle = [g.workers - g.active_count for g in pipes]
    worst = max(idle)
    if worst / workers <= threshold:
        return None
    names = [str(p + 1) for p, n in enumerate(idle) if n == worst]
    which = f"in pipe {names[0]}" if len(names) == 1 else f"in each of pipes {', '.join(names[:-1])} and {names[-1]}"
    others = "; ".join(f"pipe {p + 1}: {n} of {workers}" for p, n in enumerate(idle) if n != worst)
    g = pipes[idle.index(worst)]
    line = (f"{which}, {worst} of its {workers} tiles hold only padding ({worst / workers:.1%}"
            f"{'; ' + others if others else ''}): {d_out} × {d_in} pads to {g.d_out_pad} × {g.d_in_pad} on "
            f"power-of-2 tiles. They are never computed or stored, but each takes a gate row, and "
            f"{g.active_count} tiles of the pipe do work.")

    def share(w: int) -> float:
        return max(1 - q.active_count / q.workers for q in plan_pipes(d_in, d_out, w))

    fewer = [(w, share(w)) for w in (workers // 2, workers // 4) if w >= 2]
    helps = [(w, s) for w, s in fewer if s <= threshold]
    if helps:
        line += f" --workers {helps[0][0]} leaves {helps[0][1]:.1%} padding-only tiles."
    elif fewer:
        w, s = fewer[-1]
        line += (f" Fewer --workers do not remove it (at --workers {w} the share is still {s:.1%}); it costs only "
                 "gate rows.")
    bigger = [(w, plan_grid(d_in, d_out, w).active_count) for w in (workers * 2, workers * 4)]
    enough = [(w, n) for w, n in bigger if n >= workers]
    if enough:
        line += (f" For about {workers} working tiles a pipe use --workers {enough[0][0]} ({enough[0][1]} of pipe 1's "
                 "do work)")
    return line
