"""The fit's one statistics pass over the pairs (DESIGN.md §4): row sets, and the tasks that sum G and B.

:func:`prismoe_store.fit.job.fit` (its docstring has a runnable example) drives this module; the
solves and the cutting into tiles stay there, the held-out metrics are in
:mod:`prismoe_store.fit.metrics`.

**One pass, sufficient statistics.** The rows of the pairs store are cut into row blocks and the
blocks into ``tasks`` contiguous *stripes*; each stripe is a chain of Dask tasks that streams its
blocks and accumulates, in float64, per row set, ``G = XᵀX`` and ``B = XᵀZ`` (map), the stripes'
accumulators are summed (reduce) and the ridge systems are solved (small solve) — the shape of
``dask/array/linalg.py``. Every row falls into one of three seeded sets (chunking-independent,
:func:`prismoe_store.stores.pairs.row_uniform`): *held out* (``holdout``, never in the statistics),
*sub* (a ``subsample`` share of the training rows: pipe 2) and *rest*. The pass accumulates
``sub`` and ``rest`` over disjoint rows, so pipe 2's statistics cost nothing extra: the training
statistics are ``sub + rest``. Memory holds ``tasks`` accumulators and two row-block buffers
per task (in use, prefetched), whatever the row count. During the pass each task also
copies its held-out rows into the scratch (one chunk per row block) for the metrics.

**B larger than RAM.** ``B`` is ``M×N`` float64 per row set. When the stripes' accumulators do
not fit ``memory_budget``, the output columns are cut into *groups* and the pass runs once per
group: ``Z`` is read exactly once in all, ``X`` once per group, ``G`` in the first group only.
Each finished group is written to a scratch group ``_fit`` in the adapter store. (The other
order — one pass over ``X``, holding as many rows of ``X`` as the budget allows and
read-modify-writing all of the scratch ``B`` once per such super-block — moves about twice the
bytes for the same budget, half of them writes: ``B`` is float64 and must be both read and
written, while ``X``, the narrow side (``M ≪ N``), is only read.)

**Numerics.** The products of each block are summed across blocks in float64. With
``precision="mixed"`` (the default) ``G = XᵀX`` is a float64 GEMM of the float32 pairs — a product
of two float32 values is exact in float64, so ``G`` is float64-accurate whatever BLAS kernel
computes it — and ``B = XᵀZ``, which holds ``N/M`` times more products, is float32 GEMMs at twice
the speed. A GEMM's last bits depend on an output's place in it, so ``B``'s GEMMs always cover the
same fixed panels of ``PANEL`` output columns (a column group narrower than a panel reads and
multiplies its whole panel; the solves work on the same panels): the bits do not depend on how
the columns are grouped, spilled or not. Each panel (and ``G``) is one GEMM on one BLAS thread,
the panels spread over the cores by a pool, so the bits do not depend on the scheduler either
(how BLAS splits a GEMM over its threads changes them, and ``dask.distributed`` workers run BLAS
on one thread). float32 rounding (~1e-7 relative) is harmless except
along directions in which ``X`` has (almost) no variance — zero, duplicate or dependent input
columns — where the exact ``B`` is zero, the float32 one is noise, and the ridge would amplify it
by ``1/λ``. The solve drops those directions: eigenvalues of ``G`` at or below
``u²·block_rows·trace(G)/M`` (``u = 2⁻²⁴``), the level below which a float32 product's rounding
exceeds anything ``X`` can put into ``B`` (``floor`` of :func:`prismoe_store.fit.solve.factor_normal`;
a Cholesky of ``G − floor·I`` says whether there are any). The tiles then agree with those of
float64 statistics to float32 rounding (the tests hold the joint fit to ``numpy.linalg.lstsq``
within 1e-5, rank-deficient ``X`` included), except that a weight along a direction of variance
far below the mean (where the default ridge acts) may carry that rounding amplified; the
predictions hardly see it. ``precision="float64"`` (float64 GEMMs for ``B`` too, half the speed)
has none of it. ``precision="float32"`` makes ``G``
float32 as well, and is for well-conditioned ``X`` only: ``G``'s own rounding then hides its null
directions, and with duplicate or dependent input columns the solution is far from the
minimum-norm one. ``solver="qr"`` (for ill-conditioned ``X``; float64 unless ``float32``)
replaces the normal equations by a streaming TSQR of ``[X | Z]`` that keeps only ``R`` and
``QᵀZ`` (:mod:`prismoe_store.fit.solve`), so the condition number is not
squared.

>>> plan = Plan(rows=10_000, block_rows=4096, tasks=2, group_cols=8, metric_cols=8, hold_cap=512)
>>> plan.blocks, plan.stripes()
(3, [(0, 1), (1, 3)])
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr

from prismoe_store.fit.config import SUBSAMPLE_SEED_OFFSET
from prismoe_store.fit.plan import PANEL, Plan, input_slices
from prismoe_store.fit.runner import TICKERS, one_blas_thread, reuse, thread_buffer
from prismoe_store.fit.solve import qr_merge, qr_update
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.chunk_files import region_reader
from prismoe_store.stores.pairs import PairsStore, holdout_mask, row_uniform
from prismoe_store.stores.verified import reading

SUB, REST, HOLD = 0, 1, 2  # row sets: pipe 2's subsample, the other training rows, held out
SCRATCH = "_fit"  # the adapter's scratch group: statistics and held-out rows of an unfinished fit
# runtime config of the scratch arrays (not persisted: set on every open): write every chunk, zeros too,
# so a missing chunk means damage (and no chunk is compared with the fill value first)
WRITE_ALL = {"write_empty_chunks": True}


# -- the pass: what each task does -------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """Everything a pass task needs (small and picklable: tasks may run in other processes)."""

    pairs_url: str  # where the pairs are
    pairs_options: dict | None  # fsspec options for the pairs URL
    adapter_url: str  # where the adapter (and its ``_fit`` scratch) is
    adapter_options: dict | None  # fsspec options for the adapter URL
    d_in: int  # M
    holdout: float  # held-out share
    seed: int  # split seed
    subsample: float  # pipe 2's share of training rows
    block_rows: int  # rows per block
    precision: str  # product dtype
    solver: str  # "cholesky" or "qr"
    slicings: tuple[int, ...] = (0,)  # qr: input slice widths to triangularize (0: whole input)
    alphas: tuple[float, ...] = ()  # metrics: pipe weights
    scales: tuple[float, ...] = ()  # metrics: factor on each pipe's tiles (1/C_live for independent)
    sources: tuple[int, ...] = ()  # metrics: the pipe whose tiles each pipe has (itself, or an earlier copy)
    run_id: str = ""  # in-process runs: key of the fit's progress callback in TICKERS, ticked per block


def categories(p: Pass, start: int, stop: int) -> np.ndarray:
    """Row set (SUB, REST or HOLD) of rows ``start:stop``; the same whatever the blocking."""
    cat = np.full(stop - start, REST, np.int8)
    cat[row_uniform(p.seed + SUBSAMPLE_SEED_OFFSET, start, stop) < p.subsample] = SUB
    if p.holdout > 0:
        cat[holdout_mask(p.seed, start, stop, p.holdout)] = HOLD
    return cat


@dataclass
class _Block:
    """One row block, its rows grouped by set (SUB, then REST, then HOLD; in order within a set)."""

    start: int  # first row
    stop: int  # end row
    x: np.ndarray | None  # [rows, M] float32 (None when the block holds NaN/Inf where it was checked)
    z: np.ndarray | None  # [rows, z columns] float32: the group's columns, or its whole panels (see z_cols)
    counts: np.ndarray | None  # rows per set
    off: int = 0  # the group's first column within ``z``


def panel_products(p: Pass) -> bool:
    """True when a pass computes ``B`` in float32 GEMMs over fixed column panels (see "Numerics")."""
    return p.precision != "float64" and p.solver == "cholesky"


def z_cols(p: Pass, c0: int, c1: int, n: int) -> tuple[int, int]:
    """The columns of ``z`` a pass over the group ``c0:c1`` reads: with panel products the whole
    panels the group touches (so every panel is one GEMM whatever the grouping), else the group.

    >>> p = Pass("", None, "", None, 4, 0.1, 0, 0.6, 64, "mixed", "cholesky")
    >>> z_cols(p, 600, 700, 1200), z_cols(p, 0, 1200, 1200)
    ((512, 1024), (0, 1200))
    """
    if not panel_products(p):
        return c0, c1
    return c0 // PANEL * PANEL, min(n, -(-c1 // PANEL) * PANEL)


def _finite(*arrays: np.ndarray) -> bool:
    """Whether every value is finite (a float64 sum is finite exactly when every float32 value is)."""
    return all(bool(np.isfinite(np.sum(a, dtype=np.float64))) for a in arrays)


def _blocks(p: Pass, b0: int, b1: int, rows: int, c0: int, c1: int, hold=None, first_group: bool = False
            ) -> Iterator[_Block]:
    """Read and group the row blocks ``b0:b1`` (columns :func:`z_cols` of ``z``) in a thread, one
    block ahead of the caller, so reading, decoding, reordering and copying the held-out rows to
    ``hold`` (the scratch's ``(hold_x, hold_z)``; ``hold_x`` in the first column group only) overlap
    the caller's products. Local uncompressed stores are read from their chunk files
    (:func:`prismoe_store.stores.chunk_files.region_reader`). All block-sized arrays are allocated once:
    two alternating sets, read into in the grouped order (fresh memory is slow to touch).

    Only held-out rows are checked for NaN/Inf here (the ``qr`` path checks every row): the
    statistics of the training rows are checked once per task (:func:`stats_link`), as any
    NaN/Inf in a row reaches them (``0·inf`` is NaN)."""
    store = PairsStore.open(p.pairs_url, storage_options=p.pairs_options)
    xa, za = store.x, store.z
    xr, zr = region_reader(xa), region_reader(za)
    zc0, zc1 = z_cols(p, c0, c1, za.shape[1])
    off = c0 - zc0
    work: list[dict] = [{}, {}]

    def prepare(b: int) -> _Block:
        s, e = b * p.block_rows, min(rows, (b + 1) * p.block_rows)
        cat = categories(p, s, e)
        counts = np.bincount(cat, minlength=3)
        order = np.argsort(cat, kind="stable")  # group the rows by set, keeping their order within a set
        dest = np.empty_like(order)
        dest[order] = np.arange(len(order))  # where each row goes
        buf = work[b % 2]
        with reading(f"rows {s}..{e} of {p.pairs_url}"):  # read straight into the grouped order
            x = xr.read(slice(s, e), slice(None), reuse(buf, "x", (e - s, xa.shape[1])), dest=dest)
            z = zr.read(slice(s, e), slice(zc0, zc1), reuse(buf, "z", (e - s, zc1 - zc0)), dest=dest)
        if p.solver == "qr" and not _finite(x, z[:, off:off + c1 - c0]):
            return _Block(s, e, None, None, None)
        t = len(order) - int(counts[HOLD])  # held-out rows come last
        if not _finite(x[t:], z[t:, off:off + c1 - c0]):
            return _Block(s, e, None, None, None)
        if hold is not None and t < len(order):
            hold[1][b, :len(order) - t, c0:c1] = z[t:, off:off + c1 - c0]
            if first_group:
                hold[0][b, :len(order) - t, :] = x[t:]
        return _Block(s, e, x, z, counts, off)

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(prepare, b0) if b0 < b1 else None
        for b in range(b0, b1):
            assert nxt is not None, "a block is prepared ahead of each one used"
            cur = nxt.result()
            nxt = pool.submit(prepare, b + 1) if b + 1 < b1 else None
            yield cur


def _first_bad_block(p: Pass, b0: int, b1: int, rows: int, c0: int, c1: int) -> tuple[int, int] | None:
    """The first of the row blocks ``b0:b1`` holding NaN/Inf in ``x`` or in columns ``c0:c1`` of ``z``."""
    store = PairsStore.open(p.pairs_url, storage_options=p.pairs_options)
    for b in range(b0, b1):
        s, e = b * p.block_rows, min(rows, (b + 1) * p.block_rows)
        with reading(f"rows {s}..{e} of {p.pairs_url}"):
            if not _finite(store.x[s:e], store.z[s:e, c0:c1]):
                return s, e
    return None


class Stats:
    """One stripe's accumulator for one column group: per row set (SUB, REST) and slicing, G and B
    (``cholesky``) or R and QᵀZ (``qr``), all float64."""

    def __init__(self, p: Pass, ncols: int, with_g: bool):
        m, k = p.d_in, len(p.slicings)
        self.counts = np.zeros(3, np.int64)  # rows seen per set (SUB, REST, HOLD)
        self.bad: tuple[int, int] | None = None  # first row block holding NaN/Inf
        self.overflow = False  # float32 products overflowed on finite rows
        self.g = [[np.zeros((m, m)) for _ in range(k)] for _ in (SUB, REST)] if with_g else None
        self.b = [[np.zeros((m, ncols)) for _ in range(k)] for _ in (SUB, REST)]
        self._bufs: dict[str, np.ndarray] = {}  # work arrays reused across blocks (not pickled)

    def add(self, p: Pass, x: np.ndarray, z: np.ndarray, counts: np.ndarray, off: int = 0) -> None:
        """Add a block whose rows are grouped by set (see :class:`_Block`); the group's columns
        are ``z[:, off:off + ncols]`` (with panel products ``z`` holds their whole panels)."""
        self.counts += counts
        ncols = self.b[0][0].shape[1]
        xg = x  # the rows G and the QR path see
        if p.precision == "float64" or p.solver == "qr":
            z = z[:, off:off + ncols]
            if p.precision != "float32":
                x64 = reuse(self._bufs, "x64", x.shape, np.float64)
                z64 = reuse(self._bufs, "z64", z.shape, np.float64)
                x64[...], z64[...] = x, z
                x = xg = x64
                z = z64
            off = 0
        elif p.precision == "mixed" and self.g is not None:
            xg = reuse(self._bufs, "x64", x.shape, np.float64)
            xg[...] = x
        if p.solver == "cholesky" and x.dtype == np.float32:  # panel products, one BLAS thread each
            jobs: list[tuple] = []
            lo = 0
            for s in (SUB, REST):
                hi = lo + int(counts[s])
                if hi > lo:
                    if self.g is not None:
                        jobs.append((self._gram, self.g[s][0], xg[lo:hi]))
                    jobs += [(self._panel, self.b[s][0], x[lo:hi], z[lo:hi], j0, off)
                             for j0 in range(0, z.shape[1], PANEL)
                             if max(j0, off) < min(z.shape[1], j0 + PANEL, off + ncols)]
                lo = hi
            with one_blas_thread() as pool:
                for f in [pool.submit(job[0], *job[1:]) for job in jobs]:
                    f.result()
            return
        lo = 0
        for s in (SUB, REST):
            hi = lo + int(counts[s])
            if hi > lo:
                if p.solver == "qr":
                    self._qr(p, s, xg[lo:hi], z[lo:hi])
                else:
                    if self.g is not None:  # numpy computes xᵀx with syrk (the symmetric half)
                        g_out = reuse(self._bufs, "g", self.g[s][0].shape, xg.dtype)
                        self.g[s][0] += np.matmul(xg[lo:hi].T, xg[lo:hi], out=g_out)
                    b_out = reuse(self._bufs, "p", self.b[s][0].shape, np.float64)
                    self.b[s][0] += np.matmul(x[lo:hi].T, z[lo:hi], out=b_out)
            lo = hi

    @staticmethod
    def _gram(g: np.ndarray, x: np.ndarray) -> None:
        """``g += xᵀx`` (numpy computes it with syrk, the symmetric half)."""
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found at the task's end
            g += np.matmul(x.T, x, out=thread_buffer("g", g.shape, x.dtype))

    @staticmethod
    def _panel(b: np.ndarray, x: np.ndarray, z: np.ndarray, j0: int, off: int) -> None:
        """``b += (xᵀz)[:, off:off + ncols]`` on the panel of ``z``'s columns ``j0:j0 + PANEL``: one
        float32 GEMM of the whole panel, whatever part of it the group holds."""
        j1 = min(z.shape[1], j0 + PANEL)
        lo, hi = max(j0, off), min(j1, off + b.shape[1])
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.matmul(x.T, z[:, j0:j1], out=thread_buffer("p", (x.shape[1], j1 - j0), np.float32))
            b[:, lo - off:hi - off] += out[:, lo - j0:hi - j0]

    def finite(self) -> bool:
        """Whether every accumulated value is finite."""
        return all(bool(np.isfinite(a).all()) for sets in (self.g or [], self.b) for per in sets for a in per)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_bufs"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _bufs={})

    def _qr(self, p: Pass, s: int, x: np.ndarray, z: np.ndarray) -> None:
        assert self.g is not None, "QR keeps its R factors where G would be"
        for k, width in enumerate(p.slicings):
            r, qz = self.g[s][k], self.b[s][k]
            for c0, c1 in input_slices(p.d_in, width):
                r[c0:c1, c0:c1], qz[c0:c1] = qr_update(r[c0:c1, c0:c1], qz[c0:c1], x[:, c0:c1], z)

    def merge(self, other: Stats, p: Pass) -> Stats:
        """Add another stripe's accumulator into this one (in place)."""
        self.counts += other.counts
        if other.bad is not None and (self.bad is None or other.bad < self.bad):
            self.bad = other.bad
        self.overflow |= other.overflow
        for s in (SUB, REST):
            self._combine(p, s, other.g[s] if other.g else None, other.b[s])
        return self

    def _combine(self, p: Pass, s: int, g2, b2) -> None:
        for k, width in enumerate(p.slicings):
            if p.solver == "qr":
                assert self.g is not None, "QR keeps its R factors where G would be"
                r, qz = self.g[s][k], self.b[s][k]
                for c0, c1 in input_slices(p.d_in, width):
                    r[c0:c1, c0:c1], qz[c0:c1] = qr_merge(r[c0:c1, c0:c1], qz[c0:c1], g2[k][c0:c1, c0:c1], b2[k][c0:c1])
            else:
                if self.g is not None:
                    self.g[s][k] += g2[k]
                self.b[s][k] += b2[k]

    def sets(self, p: Pass) -> dict[str, tuple[list | None, list]]:
        """``{"train": (G per slicing, B per slicing), "sub": ...}``; train = sub + rest (REST reused)."""
        self._combine(p, REST, self.g[SUB] if self.g else None, self.b[SUB])
        return {"train": (self.g[REST] if self.g else None, self.b[REST]),
                "sub": (self.g[SUB] if self.g else None, self.b[SUB])}


def stats_link(p: Pass, rows: int, c0: int, c1: int, b0: int, b1: int, with_g: bool, first_group: bool,
               acc: Stats | None) -> Stats:
    """Accumulate blocks ``b0:b1`` into ``acc`` (a new one when None); copy their held-out rows to
    the scratch. Stops at the first block found with NaN/Inf and records it (rows that reach the
    statistics are checked through them, at the end: see :func:`_blocks`)."""
    acc = acc if acc is not None else Stats(p, c1 - c0, with_g)
    if acc.bad is not None or acc.overflow:
        return acc
    hold = _hold_arrays(p) if p.holdout > 0 else None
    for blk in _blocks(p, b0, b1, rows, c0, c1, hold, first_group):
        if blk.x is None or blk.z is None or blk.counts is None:  # a block with NaN/Inf
            acc.bad = (blk.start, blk.stop)
            return acc
        acc.add(p, blk.x, blk.z, blk.counts, blk.off)
        tick = TICKERS.get(p.run_id)
        if tick is not None:
            tick(1)
    if not acc.finite():  # NaN/Inf rows (found again, block by block), or an overflow of finite ones
        acc.bad = _first_bad_block(p, b0, b1, rows, c0, c1)
        acc.overflow = acc.bad is None
    return acc


def _hold_arrays(p: Pass) -> tuple[zarr.Array, zarr.Array]:
    g = AdapterStore.open(p.adapter_url, "r+", storage_options=p.adapter_options).group
    return g[f"{SCRATCH}/hold_x"].with_config(WRITE_ALL), g[f"{SCRATCH}/hold_z"].with_config(WRITE_ALL)



# -- running chains of tasks on a scheduler ------------------------------------------------


def link_blocks(p: Pass, plan: Plan, ncols: int) -> int:
    """Row blocks per task when a stripe's accumulator travels between processes: a task reads at
    least 4× the accumulator's bytes (the chain also gives progress as its tasks finish)."""
    acc = 2 * len(p.slicings) * 8 * p.d_in * (ncols + p.d_in)
    block = 4 * plan.block_rows * (p.d_in + ncols)
    return max(1, -(-4 * acc // block))
