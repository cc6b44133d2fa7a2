"""Phase 1: the one-shot streaming fit of the three pipes' tiles (DESIGN.md §4).

**One pass, sufficient statistics.** The rows of the pairs store are cut into row blocks and the
blocks into ``tasks`` contiguous *stripes*; each stripe is a chain of Dask tasks that streams its
blocks and accumulates, in float64, per row set, ``G = XᵀX`` and ``B = XᵀZ`` (map), the stripes'
accumulators are summed (reduce) and the ridge systems are solved (small solve) — the shape of
``dask/array/linalg.py``. Every row falls into one of three seeded sets (chunking-independent,
:func:`prismoe_store.pairs.row_uniform`): *held out* (``holdout``, never in the statistics),
*sub* (a ``subsample`` share of the training rows: pipe 2) and *rest*. The pass accumulates
``sub`` and ``rest`` over disjoint rows, so pipe 2's statistics cost nothing extra: the training
statistics are ``sub + rest``. Memory holds ``tasks`` accumulators and three row-block buffers
per task (read, in use, prefetched), whatever the row count.

**B larger than RAM.** ``B`` is ``M×N`` float64 per row set. When the stripes' accumulators do
not fit ``memory_budget``, the output columns are cut into *groups* and the pass runs once per
group: ``Z`` is read exactly once in all, ``X`` once per group, ``G`` in the first group only.
Each finished group is written to a scratch group ``_fit`` in the adapter store. (The other
order — one pass over ``X``, holding as many rows of ``X`` as the budget allows and
read-modify-writing all of the scratch ``B`` once per such super-block — moves about twice the
bytes for the same budget, half of them writes: ``B`` is float64 and must be both read and
written, while ``X``, the narrow side (``M ≪ N``), is only read.)

**Numerics.** The products of each block are float32 GEMMs (``precision="float32"``, the
default: the machine's fastest matrix multiply) whose results are summed across blocks in
float64, so rounding grows with the block length (4096 rows), not with the row count; on
well-conditioned data that keeps the solution within ~1e-6 of float64 least squares.
``precision="float64"`` makes the products float64 (about half the speed). ``solver="qr"``
(for ill-conditioned ``X``) replaces the normal equations by a streaming TSQR of ``[X | Z]``
that keeps only ``R`` and ``QᵀZ`` (:mod:`prismoe_store.solve`), so the condition number is not
squared. λ defaults to ``1e-6 · trace(G)/M`` per statistics set (:func:`solve.default_ridge`).

**Solves and pipes.** Pipe 1 fits on all training rows and pipe 3 on the same statistics with
its own grid; pipe 2 on the ``sub`` rows. ``joint``: each output band ``W_r = (G + λI)⁻¹ B_r``
over the whole input, cut into the band's tiles (one Cholesky per statistics set).
``independent``: each tile ``T = (G_cc + λI)⁻¹ B_c,r`` from its own input slice; a pipe's
prediction averages its tiles over the live input slices (per-band weights ``1/C_live``, what
:func:`prismoe_store.routing.route` gives with a uniform gate and ρ = 1).

**Held-out metrics.** During the pass each task copies its held-out rows into ``_fit`` (a tenth
of the data, one chunk per row block); after the solves they are streamed once to compute,
per pipe and for ``y = Σ α_p y_p``, the relative error ``‖y − z‖/‖z‖`` and
``R² = 1 − ‖y − z‖² / ‖z − z̄‖²`` (``z̄``: per-output mean of the held-out rows), stored in the
adapter's ``metrics`` attribute.

**Resumable.** The adapter's progress records mark finished statistic groups (``fit_stats``)
and solved bands (``fit_pipe1..3``); a re-run with the same settings skips them and gives a
bit-identical adapter (the plan — block rows, stripes, groups — is stored on the first run and
reused). The scratch is deleted when the fit completes (``keep_statistics`` keeps it).

>>> import numpy as np
>>> from prismoe_store.pairs import PairsStore
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((600, 8)).astype(np.float32)
>>> w = rng.standard_normal((12, 8)).astype(np.float32)
>>> p = PairsStore.create("memory://doc-fit-pairs", d_in=8, d_out=12, rows_per_chunk=128, overwrite=True)
>>> _ = p.append(x, x @ w.T)
>>> a = fit(p, "memory://doc-fit-adapter", workers=4, overwrite=True)
>>> bool(np.allclose(a.dense(0), w, atol=1e-4)), a.attrs()["metrics"]["combined"]["r2"] > 0.999
(True, True)
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype

from .adapter import MODES, AdapterStore
from .errors import DataError, FitError, GridError, StoreError, StoreFormatError
from .grid import GridSpec, is_pow2, plan_pipes
from .pairs import PairsStore, holdout_mask, row_uniform
from .solve import Factor, default_ridge, factor_normal, factor_qr, qr_merge, qr_update
from .stores import StoreOptions, create_chunked, reading

SOLVERS = ("cholesky", "qr")
PRECISIONS = ("float32", "float64")
SCHEDULERS = ("threads", "processes", "synchronous")
DEFAULT_BLOCK_ROWS = 4096  # rows per product block: long enough for GEMM speed, short for float32 rounding
SUBSAMPLE_SEED_OFFSET = 1 << 32  # pipe 2's subsample uses row_uniform(seed + this)
SUB, REST, HOLD = 0, 1, 2  # row sets: pipe 2's subsample, the other training rows, held out
STAT_SETS = ("train", "sub")  # statistics kept per fit: all training rows, and pipe 2's rows
PIPE_SETS = ("train", "sub", "train")  # which statistics pipe p fits on
_SCRATCH = "_fit"  # the adapter's scratch group: statistics and held-out rows of an unfinished fit
_SCRATCH_CHUNK_BYTES = 32 << 20  # target size of a chunk of the scratch B
ProgressFn = Callable[[int, int], None]
_TICKERS: dict[str, Callable[[int], None]] = {}  # in-process progress callbacks of running fits, by run id
_TICKERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class FitConfig:
    """Settings of a fit; the first group changes the result, the second only speed and memory.

    >>> FitConfig(mode="independent", holdout=0.2).subsample
    0.6
    """

    mode: str = "joint"  # "joint" (band-wise ridge over the whole input) or "independent" (per-tile ridge)
    workers: int = 512  # tiles per pipe, a power of 2 (the grids come from plan_pipes)
    grids: tuple[GridSpec, ...] | None = None  # the three pipes' grids; None: plan_pipes(d_in, d_out, workers)
    ridge: float | None = None  # λ ≥ 0; None: 1e-6·trace(G)/M for each statistics set
    holdout: float = 0.1  # share of rows held out for the metrics, in [0, 1)
    subsample: float = 0.6  # share of training rows pipe 2 fits on, in (0, 1]
    seed: int = 0  # seeds the held-out split and pipe 2's subsample
    alphas: tuple[float, ...] | None = None  # pipe weights α (non-negative, sum 1); None: equal
    solver: str = "cholesky"  # "cholesky" (normal equations) or "qr" (streaming TSQR, ill-conditioned X)
    precision: str = "float32"  # dtype of each block's products; always summed across blocks in float64
    # -- speed and memory only --
    memory_budget: int | None = None  # bytes for accumulators and row blocks; None: 1/4 of physical RAM
    block_rows: int | None = None  # rows per product block; None: 4096 rounded up to the store's row chunks
    tasks: int | None = None  # row stripes accumulated in parallel; None: cores/2 (≤ 4) locally, a cluster's threads
    keep_statistics: bool = False  # keep the ``_fit`` scratch (G, B, held-out rows) after the fit

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not is_pow2(self.workers):
            raise GridError(f"workers must be a power of 2, got {self.workers!r}")
        if self.grids is not None:
            grids = tuple(self.grids)
            if len(grids) != 3 or not all(isinstance(g, GridSpec) for g in grids):
                raise GridError("grids must be three GridSpec, one per pipe")
            object.__setattr__(self, "grids", grids)
        if self.ridge is not None and not (np.isfinite(self.ridge) and self.ridge >= 0):
            raise DataError(f"ridge must be a finite number ≥ 0, got {self.ridge!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise DataError(f"holdout must be in [0, 1), got {self.holdout!r}")
        if not 0.0 < self.subsample <= 1.0:
            raise DataError(f"subsample must be in (0, 1], got {self.subsample!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < SUBSAMPLE_SEED_OFFSET:
            raise DataError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.alphas is not None:
            alphas = tuple(float(a) for a in self.alphas)
            if len(alphas) != 3 or any(not np.isfinite(a) or a < 0 for a in alphas) or abs(sum(alphas) - 1) > 1e-6:
                raise DataError(f"alphas must be 3 non-negative numbers summing to 1, got {list(alphas)}")
            object.__setattr__(self, "alphas", alphas)
        if self.solver not in SOLVERS:
            raise DataError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.precision not in PRECISIONS:
            raise DataError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("memory_budget", "block_rows", "tasks"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DataError(f"{name} must be a positive integer, got {v!r}")

    def settings(self, grids: Sequence[GridSpec]) -> dict:
        """The result-affecting settings as plain data (stored in the adapter; compared on resume)."""
        d = {k: v for k, v in asdict(self).items()
             if k not in ("memory_budget", "block_rows", "tasks", "keep_statistics", "grids", "workers")}
        d["grids"] = [g.to_dict() for g in grids]
        d["alphas"] = list(self.alphas) if self.alphas is not None else None
        return d


# -- the plan: how rows and output columns are cut -------------------------------------------


@dataclass(frozen=True)
class _Plan:
    rows: int  # S: rows the fit reads (the store's committed rows when it started)
    block_rows: int  # rows per product block (a multiple of the store's row chunk)
    tasks: int  # row stripes (parallel accumulators)
    group_cols: int  # output columns per statistics group
    metric_cols: int  # output columns per metrics group
    hold_cap: int  # most held-out rows in one block (the held-out scratch's chunk height)

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def stripes(self) -> list[tuple[int, int]]:
        """Block ranges ``[b0, b1)`` of the stripes (empty stripes dropped)."""
        nb, t = self.blocks, min(self.tasks, self.blocks)
        edges = [nb * i // t for i in range(t + 1)]
        return [(edges[i], edges[i + 1]) for i in range(t) if edges[i + 1] > edges[i]]


def _location(url) -> str:
    """A store URL as tasks anywhere can open it: local paths made absolute.

    >>> _location("memory://x"), _location("/data/p")
    ('memory://x', '/data/p')
    """
    url = str(url)
    return url if "://" in url else os.path.abspath(url)


def _groups(n: int, width: int) -> list[tuple[int, int]]:
    return [(c, min(n, c + width)) for c in range(0, n, width)]


def _slices(m: int, width: int) -> list[tuple[int, int]]:
    """Real input columns of each slice of ``width`` (``0``: the whole input)."""
    return [(0, m)] if width == 0 else [(c, min(m, c + width)) for c in range(0, m, width)]


def _budget_cols(budget: int, tasks: int, fixed: int, per_col: int, n: int, align: int, what: str) -> int:
    cols = (budget // tasks - fixed) // per_col
    if cols < 1:
        need = tasks * (fixed + per_col)
        raise FitError(f"memory budget of {budget / 2**20:.2f} MiB is too small for {what} "
                       f"(needs at least {need / 2**20:.2f} MiB with {tasks} tasks): raise it or lower --tasks")
    if cols >= n:
        return n
    return cols // align * align if cols >= align else cols


def _block_rows(cfg: FitConfig, pairs: PairsStore, rows: int) -> int:
    rc = pairs.rows_per_chunk
    block = cfg.block_rows or max(rc, -(-DEFAULT_BLOCK_ROWS // rc) * rc)
    return min(block, max(1, rows))


def _make_plan(cfg: FitConfig, pairs: PairsStore, rows: int, block: int, tasks: int, hold_cap: int,
               n_slicings: int) -> _Plan:
    m, n = pairs.d_in, pairs.d_out
    budget = cfg.memory_budget or _default_budget()
    align = int(pairs.z.chunks[1])
    f64 = 8 if cfg.precision == "float64" else 0
    if cfg.solver == "cholesky":
        # per task: 2 row sets of B (float64) and a float32 product; block buffers: one read buffer
        # and two reordered ones (the block in use and the one prefetched), plus float64 copies
        per_col = 20 * m + (12 + f64) * block
        fixed = 20 * m * m + (12 + f64) * block * m
    else:
        # per task and slicing: 2 row sets of R and QᵀZ; Q of a (m+block)×m QR; stacked [QᵀZ; z]
        per_col = n_slicings * 16 * m + 16 * (m + block) + 12 * block
        fixed = n_slicings * 16 * m * m + 16 * (m + block) * m + 12 * block * m
    tasks = max(1, min(tasks, -(-rows // block)))
    while tasks > 1 and tasks * (fixed + per_col * min(n, align)) > budget:
        tasks -= 1  # fewer stripes before narrower groups: each stripe holds a whole G
    group = _budget_cols(budget, tasks, fixed, per_col, n, align, "the statistics G and one column group of B")
    cap = max(1, hold_cap)
    # metrics: the three pipes' rows of W (float32), predictions, held-out z and column stats
    per_col_m = 12 * m + 6 * 4 * cap + 24
    fixed_m = 8 * cap * m
    metric = _budget_cols(budget, tasks, fixed_m, per_col_m, n, align, "the held-out metrics")
    return _Plan(rows=rows, block_rows=block, tasks=tasks, group_cols=group, metric_cols=metric, hold_cap=cap)


def _default_budget() -> int:
    import psutil

    return max(256 << 20, psutil.virtual_memory().total // 4)


# -- the pass: what each task does -------------------------------------------------------------


@dataclass(frozen=True)
class _Pass:
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
    run_id: str = ""  # in-process runs: key of the fit's progress callback in _TICKERS, ticked per block


def _categories(p: _Pass, start: int, stop: int) -> np.ndarray:
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
    x: np.ndarray | None  # [rows, M] float32 (None when the block holds NaN/Inf)
    z: np.ndarray | None  # [rows, group columns] float32
    counts: np.ndarray | None  # rows per set


def _blocks(p: _Pass, b0: int, b1: int, rows: int, c0: int, c1: int) -> Iterator[_Block]:
    """Read, check and group the row blocks ``b0:b1`` (columns ``c0:c1`` of ``z``) in a thread, one
    block ahead of the caller, so reading, decoding and reordering overlap the caller's products.
    All block-sized arrays are allocated once: one read buffer and two alternating output sets."""
    store = PairsStore.open(p.pairs_url, storage_options=p.pairs_options)
    xa, za = store.x, store.z
    read_buf: dict = {}
    work: list[dict] = [{}, {}]

    def prepare(b: int) -> _Block:
        s, e = b * p.block_rows, min(rows, (b + 1) * p.block_rows)
        with reading(f"rows {s}..{e} of {p.pairs_url}"):
            x = _read_into(xa, (slice(s, e), slice(None)), _reuse(read_buf, "x", (e - s, xa.shape[1])))
            z = _read_into(za, (slice(s, e), slice(c0, c1)), _reuse(read_buf, "z", (e - s, c1 - c0)))
        # a float64 sum is finite exactly when every value is (finite float32 sums cannot overflow it)
        if not (np.isfinite(np.sum(x, dtype=np.float64)) and np.isfinite(np.sum(z, dtype=np.float64))):
            return _Block(s, e, None, None, None)
        cat = _categories(p, s, e)
        order = np.argsort(cat, kind="stable")  # group the rows by set, keeping their order within a set
        buf = work[b % 2]
        x = np.take(x, order, axis=0, out=_reuse(buf, "x", x.shape), mode="clip")
        z = np.take(z, order, axis=0, out=_reuse(buf, "z", z.shape), mode="clip")
        return _Block(s, e, x, z, np.bincount(cat, minlength=3))

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(prepare, b0) if b0 < b1 else None
        for b in range(b0, b1):
            cur = nxt.result()
            nxt = pool.submit(prepare, b + 1) if b + 1 < b1 else None
            yield cur


def _read_into(array: zarr.Array, selection: tuple, out: np.ndarray) -> np.ndarray:
    """``array[selection]`` decoded into ``out`` (no fresh block-sized allocation per read)."""
    array.get_basic_selection(selection, out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
    return out


def _reuse(buffers: dict, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A work array kept in ``buffers`` across blocks (fresh large arrays cost page faults each time)."""
    need = int(np.prod(shape))
    buf = buffers.get(name)
    if buf is None or buf.size < need or buf.dtype != dtype:
        buf = buffers[name] = np.empty(need, dtype)
    return buf[:need].reshape(shape)


class _Stats:
    """One stripe's accumulator for one column group: per row set (SUB, REST) and slicing, G and B
    (``cholesky``) or R and QᵀZ (``qr``), all float64."""

    def __init__(self, p: _Pass, ncols: int, with_g: bool):
        m, k = p.d_in, len(p.slicings)
        self.counts = np.zeros(3, np.int64)  # rows seen per set (SUB, REST, HOLD)
        self.bad: tuple[int, int] | None = None  # first row block holding NaN/Inf
        self.g = [[np.zeros((m, m)) for _ in range(k)] for _ in (SUB, REST)] if with_g else None
        self.b = [[np.zeros((m, ncols)) for _ in range(k)] for _ in (SUB, REST)]
        self._bufs: dict[str, np.ndarray] = {}  # work arrays reused across blocks (not pickled)

    def add(self, p: _Pass, x: np.ndarray, z: np.ndarray, counts: np.ndarray) -> None:
        """Add a block whose rows are grouped by set (see :class:`_Block`)."""
        self.counts += counts
        if p.precision == "float64":
            x64, z64 = _reuse(self._bufs, "x64", x.shape, np.float64), _reuse(self._bufs, "z64", z.shape, np.float64)
            x64[...], z64[...] = x, z
            x, z = x64, z64
        lo = 0
        for s in (SUB, REST):
            hi = lo + int(counts[s])
            if hi > lo:
                xs, zs = x[lo:hi], z[lo:hi]
                if p.solver == "qr":
                    self._qr(p, s, xs, zs)
                else:
                    if self.g is not None:  # numpy computes xᵀx with syrk (the symmetric half)
                        g_out = _reuse(self._bufs, "g", self.g[s][0].shape, xs.dtype)
                        self.g[s][0] += np.matmul(xs.T, xs, out=g_out)
                    b_out = _reuse(self._bufs, "p", self.b[s][0].shape, xs.dtype)
                    self.b[s][0] += np.matmul(xs.T, zs, out=b_out)
            lo = hi

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_bufs"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _bufs={})

    def _qr(self, p: _Pass, s: int, x: np.ndarray, z: np.ndarray) -> None:
        for k, width in enumerate(p.slicings):
            r, qz = self.g[s][k], self.b[s][k]
            for c0, c1 in _slices(p.d_in, width):
                r[c0:c1, c0:c1], qz[c0:c1] = qr_update(r[c0:c1, c0:c1], qz[c0:c1], x[:, c0:c1], z)

    def merge(self, other: "_Stats", p: _Pass) -> "_Stats":
        """Add another stripe's accumulator into this one (in place)."""
        self.counts += other.counts
        if other.bad is not None and (self.bad is None or other.bad < self.bad):
            self.bad = other.bad
        for s in (SUB, REST):
            self._combine(p, s, other.g[s] if other.g else None, other.b[s])
        return self

    def _combine(self, p: _Pass, s: int, g2, b2) -> None:
        for k, width in enumerate(p.slicings):
            if p.solver == "qr":
                r, qz = self.g[s][k], self.b[s][k]
                for c0, c1 in _slices(p.d_in, width):
                    r[c0:c1, c0:c1], qz[c0:c1] = qr_merge(r[c0:c1, c0:c1], qz[c0:c1], g2[k][c0:c1, c0:c1], b2[k][c0:c1])
            else:
                if self.g is not None:
                    self.g[s][k] += g2[k]
                self.b[s][k] += b2[k]

    def sets(self, p: _Pass) -> dict[str, tuple[list, list]]:
        """``{"train": (G per slicing, B per slicing), "sub": ...}``; train = sub + rest (REST reused)."""
        self._combine(p, REST, self.g[SUB] if self.g else None, self.b[SUB])
        return {"train": (self.g[REST] if self.g else None, self.b[REST]),
                "sub": (self.g[SUB] if self.g else None, self.b[SUB])}


def _stats_link(p: _Pass, rows: int, c0: int, c1: int, b0: int, b1: int, with_g: bool, first_group: bool,
                acc: _Stats | None) -> _Stats:
    """Accumulate blocks ``b0:b1`` into ``acc`` (a new one when None); copy their held-out rows to
    the scratch. Stops at the first block with NaN/Inf and records it."""
    acc = acc if acc is not None else _Stats(p, c1 - c0, with_g)
    if acc.bad is not None:
        return acc
    hold = _hold_arrays(p) if p.holdout > 0 else None
    for blk in _blocks(p, b0, b1, rows, c0, c1):
        if blk.x is None:
            acc.bad = (blk.start, blk.stop)
            return acc
        acc.add(p, blk.x, blk.z, blk.counts)
        n_hold = int(blk.counts[HOLD])
        if hold is not None and n_hold:
            b, t = blk.start // p.block_rows, blk.x.shape[0] - n_hold  # held-out rows come last
            hold[1][b, :n_hold, c0:c1] = blk.z[t:]
            if first_group:
                hold[0][b, :n_hold, :] = blk.x[t:]
        tick = _TICKERS.get(p.run_id)
        if tick is not None:
            tick(1)
    return acc


def _hold_arrays(p: _Pass) -> tuple[zarr.Array, zarr.Array]:
    g = AdapterStore.open(p.adapter_url, "r+", storage_options=p.adapter_options).group
    return g[f"{_SCRATCH}/hold_x"], g[f"{_SCRATCH}/hold_z"]


# -- held-out metrics ----------------------------------------------------------------------


class _Scores:
    """One stripe's held-out sums for one column group (all float64)."""

    def __init__(self, n_pipes: int, ncols: int):
        self.rows = 0  # held-out rows seen
        self.sse = np.zeros(n_pipes + 1)  # Σ‖y_p − z‖² per pipe, then the α-combination
        self.sz2 = 0.0  # Σ‖z‖²
        self.mean = np.zeros(ncols)  # per-output mean of z (Chan's parallel update)
        self.m2 = np.zeros(ncols)  # per-output Σ(z − mean)²

    def add_z(self, z: np.ndarray) -> None:
        n = z.shape[0]
        zd = z.astype(np.float64)
        mean = zd.mean(0)
        m2 = ((zd - mean) ** 2).sum(0)
        self._merge_moments(n, mean, m2)
        self.sz2 += float(np.einsum("ij,ij->", zd, zd))

    def _merge_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        tot = self.rows + n
        if n == 0:
            return
        delta = mean - self.mean
        self.mean += delta * (n / tot)
        self.m2 += m2 + delta ** 2 * (self.rows * n / tot)
        self.rows = tot

    def merge(self, other: "_Scores") -> "_Scores":
        self.sse += other.sse
        self.sz2 += other.sz2
        self._merge_moments(other.rows, other.mean, other.m2)
        return self


def _metrics_link(p: _Pass, counts: np.ndarray, c0: int, c1: int, b0: int, b1: int, acc: _Scores | None) -> _Scores:
    """Held-out predictions of every pipe and their α-combination for blocks ``b0:b1``. A pipe
    whose tiles are another's (``p.sources``) reuses that pipe's predictions."""
    adapter = AdapterStore.open(p.adapter_url, storage_options=p.adapter_options)
    hx, hz = adapter.group[f"{_SCRATCH}/hold_x"], adapter.group[f"{_SCRATCH}/hold_z"]
    acc = acc if acc is not None else _Scores(len(p.sources), c1 - c0)
    distinct = sorted(set(p.sources))
    with reading(f"tiles of {p.adapter_url}"):
        ws = {q: adapter.tiles(q)[c0:c1, : p.d_in] for q in distinct}  # [cols, M] each
    for q in distinct:
        if p.scales[q] != 1.0:
            ws[q] *= np.float32(p.scales[q])
    for b in range(b0, b1):
        n = int(counts[b])
        if n == 0:
            continue
        with reading(f"held-out rows in {p.adapter_url}"):
            x, z = hx[b, :n, :], hz[b, :n, c0:c1]
        ys = {q: x @ ws[q].T for q in distinct}
        comb = np.zeros_like(z)
        for q, src in enumerate(p.sources):
            comb += np.float32(p.alphas[q]) * ys[src]
        for q in distinct:
            ys[q] -= z
            sse = float(np.einsum("ij,ij->", ys[q], ys[q], dtype=np.float64))
            acc.sse[[i for i, src in enumerate(p.sources) if src == q]] += sse
        comb -= z
        acc.sse[-1] += float(np.einsum("ij,ij->", comb, comb, dtype=np.float64))
        acc.add_z(z)
    return acc


# -- running chains of tasks on a scheduler ------------------------------------------------


@dataclass
class _Runner:
    """Runs per-stripe task chains on the chosen Dask scheduler and reports finished links."""

    kwargs: dict  # keyword arguments for dask.compute
    threads: int  # default number of row stripes for this scheduler
    local: bool  # True for the in-process schedulers (threads, synchronous): tasks share memory
    client: object | None = None  # a dask.distributed Client, when one is used
    owns_client: bool = False  # True when we connected it (and must close it)
    tick: Callable[[int], None] = field(default=lambda k: None)  # called with finished links

    def run(self, chains: list[list[tuple]], prefix: str) -> list:
        """Each chain is a list of ``(weight, func, *args)``; the previous link's result is appended to
        the next link's arguments (``None`` for the first). ``weight`` (row blocks) is what a
        finished link adds to the progress. Returns the last result of each chain."""
        import dask
        from dask.callbacks import Callback

        ends, weights = [], {}
        for i, chain in enumerate(chains):
            prev = None
            for j, (weight, func, *args) in enumerate(chain):
                key = f"{prefix}-{i}-{j}"
                weights[key] = weight
                prev = dask.delayed(func, pure=False)(*args, prev, dask_key_name=key)
            ends.append(prev)
        if self.client is not None:
            from distributed import as_completed

            futures = self.client.compute(ends)
            for fut in as_completed(futures):
                self.tick(sum(w for w, *_ in chains[futures.index(fut)]))
            return self.client.gather(futures)

        def posttask(key, result, dsk, state, worker_id):
            self.tick(weights.get(key, 0))

        with Callback(posttask=posttask):
            return list(dask.compute(*ends, **self.kwargs))

    def close(self) -> None:
        if self.owns_client and self.client is not None:
            self.client.close()


def _runner(scheduler, tasks: int | None) -> _Runner:
    """The runner for ``scheduler``; its ``threads`` is the default stripe count. In one process
    the products already use every core (BLAS threads) and each stripe reads its next block in a
    thread of its own, so more stripes only add reading threads: one per two cores, at most 4
    (measured on 2 cores: one stripe's pass runs at 0.62 of the matmul rate, two stripes' at 0.48)."""
    local = max(1, min(4, (os.cpu_count() or 1) // 2))
    if scheduler is None or scheduler == "threads":
        threads = tasks or local
        return _Runner({"scheduler": "threads", "num_workers": threads}, threads, True)
    if scheduler == "synchronous":  # stripes run one after the other (a reference, and for debugging)
        return _Runner({"scheduler": "synchronous"}, 1, True)
    if scheduler == "processes":
        threads = tasks or local
        return _Runner({"scheduler": "processes", "num_workers": threads}, threads, False)
    if isinstance(scheduler, str) and "://" in scheduler:
        try:
            from distributed import Client
        except ImportError:
            raise DataError("a scheduler address needs dask.distributed: "
                            "pip install 'prismoe-store[cluster]'") from None
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise DataError(f"cannot connect to the Dask scheduler at {scheduler}: {e}") from None
        return _Runner({}, max(1, sum(client.nthreads().values())), False, client, True)
    if hasattr(scheduler, "nthreads") and hasattr(scheduler, "compute"):  # a distributed.Client
        return _Runner({}, max(1, sum(scheduler.nthreads().values())), False, scheduler)
    raise DataError(f"scheduler must be threads, processes, synchronous or a tcp:// address, got {scheduler!r}")


# -- the public entry point ----------------------------------------------------------------


def fit(pairs: PairsStore | str, adapter_url, *, mode: str = "joint", workers: int = 512,
        grids: Sequence[GridSpec] | None = None, ridge: float | None = None, holdout: float = 0.1,
        subsample: float = 0.6, seed: int = 0, alphas: Sequence[float] | None = None,
        solver: str = "cholesky", precision: str = "float32", memory_budget: int | None = None,
        block_rows: int | None = None, tasks: int | None = None, keep_statistics: bool = False,
        scheduler=None, options: StoreOptions | None = None, progress: ProgressFn | None = None,
        overwrite: bool = False) -> AdapterStore:
    """Fit the three pipes' tiles on ``pairs`` by streamed ridge least squares; write the adapter.

    The settings are those of :class:`FitConfig`. ``scheduler``: ``"threads"`` (default),
    ``"processes"``, ``"synchronous"``, a ``tcp://`` address of a ``dask.distributed`` scheduler or
    a ``distributed.Client`` (the pairs and adapter URLs must then be readable by the workers).
    ``options``: the adapter's encoding. An existing unfinished adapter with the same settings is
    resumed; any other existing store is refused unless ``overwrite``.

    >>> from prismoe_store.pairs import PairsStore
    >>> p = PairsStore.open("memory://doc-fit-pairs")
    >>> a = fit(p, "memory://doc-fit-indep", workers=4, mode="independent", holdout=0.2, overwrite=True)
    >>> a.mode, a.complete, sorted(a.attrs()["metrics"])
    ('independent', True, ['combined', 'holdout_rows', 'pipes', 'warnings'])
    """
    cfg = FitConfig(mode=mode, workers=workers, grids=tuple(grids) if grids is not None else None, ridge=ridge,
                    holdout=holdout, subsample=subsample, seed=seed,
                    alphas=tuple(alphas) if alphas is not None else None, solver=solver, precision=precision,
                    memory_budget=memory_budget, block_rows=block_rows, tasks=tasks,
                    keep_statistics=keep_statistics)
    return _Fit(cfg, pairs, adapter_url, scheduler, options, progress, overwrite).run()


class _Fit:
    """One fit run: checks, plan, statistics pass, solves, metrics (see the module docstring)."""

    def __init__(self, cfg: FitConfig, pairs, adapter_url, scheduler, options, progress, overwrite):
        self.cfg = cfg
        self.pairs = pairs if isinstance(pairs, PairsStore) else PairsStore.open(str(pairs))
        self.adapter_url = _location(adapter_url)
        self.options = options or StoreOptions()
        self.progress = progress
        self.overwrite = overwrite
        self.scheduler = scheduler
        self.timings: dict[str, float] = {}
        self._done = 0
        self._total = 0
        self._lock = threading.Lock()

    # -- checks --
    def _check_pairs(self) -> tuple[int, tuple[GridSpec, ...]]:
        p = self.pairs
        m, n, rows = p.d_in, p.d_out, p.rows
        if p.x.ndim != 2 or p.z.ndim != 2 or p.x.shape[1] != m or p.z.shape[1] != n:
            raise DataError(f"pairs {p.url}: x {p.x.shape} and z {p.z.shape} do not match d_in={m}, d_out={n}")
        if p.x.shape[0] < rows or p.z.shape[0] < rows:
            raise DataError(f"pairs {p.url} claim {rows} rows but x has {p.x.shape[0]} and z {p.z.shape[0]}: "
                            "the store is damaged (mismatched row counts)")
        if rows < 2:
            raise DataError(f"pairs {p.url} hold {rows} rows: a fit needs at least 2")
        grids = self.cfg.grids or plan_pipes(m, n, self.cfg.workers)
        for i, g in enumerate(grids):
            if (g.d_in, g.d_out) != (m, n):
                raise GridError(f"the grid of pipe {i + 1} covers {g.d_in}→{g.d_out} but the pairs are {m}→{n}")
        return rows, tuple(grids)

    def _count(self, p: _Pass, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows per set, and held-out rows per block (checked: enough of each)."""
        block = p.block_rows
        per_block = np.zeros(-(-rows // block), np.int64)
        total = np.zeros(3, np.int64)
        for b, s in enumerate(range(0, rows, block)):
            c = np.bincount(_categories(p, s, min(rows, s + block)), minlength=3)
            total += c
            per_block[b] = c[HOLD]
        cfg = self.cfg
        if cfg.holdout > 0 and total[HOLD] == 0:
            raise DataError(f"{rows} rows with a {cfg.holdout} holdout leave no held-out row: "
                            "add rows or lower --holdout (0 disables the metrics)")
        if total[SUB] + total[REST] < 1 or total[SUB] < 1:
            raise DataError(f"{rows} rows leave {total[SUB] + total[REST]} training rows and {total[SUB]} for pipe 2: "
                            "add rows, lower --holdout or raise --subsample")
        return total, per_block

    # -- progress --
    def _tick(self, k: int = 1) -> None:
        with self._lock:  # tasks of in-process schedulers tick from their threads
            self._done += k
            if self.progress is not None:
                self.progress(min(self._done, self._total), self._total)

    # -- main --
    def run(self) -> AdapterStore:
        cfg, pairs = self.cfg, self.pairs
        t0 = time.perf_counter()
        rows, grids = self._check_pairs()
        m = pairs.d_in
        # the input slicings the statistics need: QR triangularizes each slice of an independent fit
        slicings = (0,)
        if cfg.solver == "qr" and cfg.mode == "independent":
            slicings = tuple(sorted({g.tile_in for g in grids}))
        source = {"url": _location(pairs.url), "rows": rows, "d_in": m, "d_out": pairs.d_out}
        runner = _runner(self.scheduler, cfg.tasks)
        run_id = uuid.uuid4().hex if runner.local else ""  # in-process tasks tick the progress per block
        try:
            adapter, plan = self._resume(grids, source)
            block = plan.block_rows if plan else _block_rows(cfg, pairs, rows)
            base = _Pass(pairs_url=source["url"], pairs_options=None, adapter_url=self.adapter_url,
                         adapter_options=self.options.storage_options, d_in=m, holdout=cfg.holdout, seed=cfg.seed,
                         subsample=cfg.subsample, block_rows=block, precision=cfg.precision,
                         solver=cfg.solver, slicings=slicings, run_id=run_id)
            counts, per_block = self._count(base, rows)
            if adapter is None:
                plan = _make_plan(cfg, pairs, rows, block, cfg.tasks or runner.threads,
                                  int(per_block.max(initial=0)), len(slicings))
                adapter = AdapterStore.create(
                    self.adapter_url, grids=grids, mode=cfg.mode, alphas=cfg.alphas, options=self.options,
                    overwrite=self.overwrite,
                    attrs={"fit": {"settings": cfg.settings(grids), "pairs": source, "plan": asdict(plan)}})
                self._create_scratch(adapter, plan, slicings)
            runner.tick = self._tick
            if run_id:
                with _TICKERS_LOCK:
                    _TICKERS[run_id] = self._tick
            self._plan = plan
            self._plan_progress(adapter, plan, grids)
            stats = self._statistics(adapter, plan, base, runner)
            self.timings["statistics_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            lams = self._solve(adapter, grids, stats)
            self.timings["solve_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            metrics = self._metrics(adapter, grids, plan, base, runner, per_block)
            self.timings["metrics_s"] = time.perf_counter() - t2
        finally:
            runner.close()
            with _TICKERS_LOCK:
                _TICKERS.pop(run_id, None)
        for p in range(len(grids)):
            used = counts[SUB] + (counts[REST] if PIPE_SETS[p] == "train" else 0)
            adapter.group[f"pipe{p + 1}"].attrs["rows"] = int(used)
        info = dict(adapter.attrs()["fit"])
        info.update(ridge=lams, counts={"train": int(counts[SUB] + counts[REST]), "sub": int(counts[SUB]),
                                        "holdout": int(counts[HOLD])}, timings=self.timings)
        adapter.update_attrs(fit=info, metrics=metrics)
        if not cfg.keep_statistics and _SCRATCH in adapter.group:
            del adapter.group[_SCRATCH]
        adapter.update_attrs(complete=True)
        return adapter

    def _warn(self, adapter: AdapterStore, msg: str) -> None:
        """Record a solver warning in the adapter at once (so a resumed run keeps it)."""
        info = dict(adapter.attrs()["fit"])
        old = list(info.get("warnings", []))
        if msg not in old:
            adapter.update_attrs(fit={**info, "warnings": old + [msg]})

    def _resume(self, grids, source: dict) -> tuple[AdapterStore | None, _Plan | None]:
        """The unfinished adapter to resume (with its plan), or ``(None, None)`` to create one."""
        if self.overwrite:
            return None, None
        try:
            old = AdapterStore.open(self.adapter_url, "r+", storage_options=self.options.storage_options)
        except StoreFormatError:
            raise StoreError(f"{self.adapter_url} already exists and is not an adapter "
                             "(pass overwrite=True / --overwrite to replace it)") from None
        except StoreError:
            return None, None  # nothing there (AdapterStore.create refuses any other leftover)
        info = old.attrs().get("fit", {})
        if old.complete:
            raise StoreError(f"adapter {self.adapter_url} already exists and is complete "
                             "(pass overwrite=True / --overwrite to refit)")
        if info.get("settings") != self.cfg.settings(grids) or info.get("pairs") != source or "plan" not in info:
            raise StoreError(f"{self.adapter_url} holds an unfinished fit with other settings or pairs "
                             "(pass overwrite=True / --overwrite to start over)")
        if _SCRATCH not in old.group:
            raise StoreError(f"{self.adapter_url} holds an unfinished fit without its scratch: use --overwrite")
        return old, _Plan(**info["plan"])

    def _create_scratch(self, adapter: AdapterStore, plan: _Plan, slicings) -> None:
        m, n = self.pairs.d_in, self.pairs.d_out
        raw = StoreOptions(compressor="none", storage_options=self.options.storage_options)
        g = adapter.group.create_group(_SCRATCH)
        # column chunks: whole multiples of z's chunks up to ~32 MiB of B, so a group writes few
        align = int(self.pairs.z.chunks[1])
        cw = min(n, plan.group_cols, max(align, (_SCRATCH_CHUNK_BYTES // (8 * m)) // align * align))
        for s in STAT_SETS:
            for w in slicings:
                create_chunked(g, f"{s}_G{w}", (m, m), (m, m), "float64", raw)
                create_chunked(g, f"{s}_B{w}", (m, n), (m, cw), "float64", raw)
        if self.cfg.holdout > 0:
            create_chunked(g, "hold_x", (plan.blocks, plan.hold_cap, m), (1, plan.hold_cap, m), "float32", raw)
            create_chunked(g, "hold_z", (plan.blocks, plan.hold_cap, n), (1, plan.hold_cap, cw), "float32", raw)

    def _plan_progress(self, adapter, plan: _Plan, grids) -> None:
        n = self.pairs.d_out
        n_groups = len(_groups(n, plan.group_cols))
        self._total = n_groups * plan.blocks + sum(g.rows for g in grids)
        if self.cfg.holdout > 0:
            self._total += len(_groups(n, plan.metric_cols)) * plan.blocks
        self._done = len(adapter.progress("fit_stats", n_groups).done()) * plan.blocks
        for p, g in enumerate(grids):
            self._done += len(adapter.progress(f"fit_pipe{p + 1}", g.rows).done())
        self._tick(0)

    # -- statistics --
    def _statistics(self, adapter: AdapterStore, plan: _Plan, p: _Pass, runner: _Runner) -> "_StatSource":
        n = self.pairs.d_out
        groups = _groups(n, plan.group_cols)
        record = adapter.progress("fit_stats", len(groups))
        scratch = adapter.group[_SCRATCH]
        source = _StatSource(scratch, p.slicings)
        for gi in record.missing():
            c0, c1 = groups[gi]
            with_g = gi == 0 or p.solver == "qr"  # the normal equations' G comes from the first group
            chains = []
            for b0, b1 in plan.stripes():
                # in-process: one task per stripe (ticking per block); else a chain of tasks, see _link_blocks
                step = b1 - b0 if runner.local else _link_blocks(p, plan, c1 - c0)
                chains.append([(0 if runner.local else min(b1, lb + step) - lb, _stats_link, p, plan.rows, c0, c1,
                                lb, min(b1, lb + step), with_g, gi == 0) for lb in range(b0, b1, step)])
            results = runner.run(chains, f"fit-stats-g{gi}")
            acc = results[0]
            for other in results[1:]:
                acc.merge(other, p)
            if acc.bad is not None:
                s, e = acc.bad
                raise DataError(f"rows {s}..{e} of {self.pairs.url} hold NaN or Inf (first bad row block): "
                                "clean the pairs (prismoe collect --on-nonfinite) and re-run")
            sets = acc.sets(p)
            for name, (gs, bs) in sets.items():
                for k, w in enumerate(p.slicings):
                    scratch[f"{name}_B{w}"][:, c0:c1] = bs[k]
                    if gi == 0:
                        scratch[f"{name}_G{w}"][...] = gs[k]
            record.mark(gi)
            if len(groups) == 1:
                source.keep(sets)
        return source

    # -- solves --
    def _solve(self, adapter: AdapterStore, grids, stats: "_StatSource") -> dict[str, float]:
        cfg, m, n = self.cfg, self.pairs.d_in, self.pairs.d_out
        lams = dict(adapter.attrs().get("fit", {}).get("ridge") or {})
        for s in STAT_SETS:
            if s not in lams:
                g0 = stats.g(s, stats.slicings[0])
                trace = float(np.trace(g0)) if cfg.solver == "cholesky" else float(np.sum(g0 * g0))
                lams[s] = float(cfg.ridge) if cfg.ridge is not None else default_ridge(trace, m)
        fit_attrs = dict(adapter.attrs()["fit"])
        adapter.update_attrs(fit={**fit_attrs, "ridge": lams})
        factors: dict[tuple, list] = {}
        self._adapter = adapter
        sources = self._sources(grids)
        for p, grid in enumerate(grids):
            record = adapter.progress(f"fit_pipe{p + 1}", grid.rows)
            set_name, a = PIPE_SETS[p], grid.tile_out
            width = 0 if cfg.mode == "joint" else grid.tile_in
            # write every chunk, zero tiles too (readers take a missing chunk for damage); the setting
            # is not stored with the array, so it is set here as well as at creation
            tiles, src = adapter.tiles(p).with_config({"write_empty_chunks": True}), adapter.tiles(sources[p])
            for r0, r1 in _band_runs(record.missing(), max(1, self._plan.group_cols // a)):
                o0, o1 = r0 * a, min(n, r1 * a)  # o1 <= o0: output padding only, written as zeros
                block = np.zeros(((r1 - r0) * a, grid.d_in_pad), np.float32)
                if o1 > o0 and sources[p] != p:  # the same dense solution, already written: copy it
                    with reading(f"tiles of pipe {sources[p] + 1} in {self.adapter_url}"):
                        block[: o1 - o0, :m] = src[o0:o1, :m]
                elif o1 > o0:
                    key = (set_name, width)
                    if key not in factors:
                        factors[key] = self._factors(stats, set_name, width, lams[set_name])
                    rhs = stats.b(set_name, width if cfg.solver == "qr" else 0, o0, o1)
                    for (c0, c1), f in zip(_slices(m, width), factors[key]):
                        block[: o1 - o0, c0:c1] = f.solve(rhs[c0:c1]).T
                tiles[r0 * a:r1 * a, :] = block
                record.mark_many(range(r0, r1))
                self._tick(r1 - r0)
        return lams

    def _sources(self, grids) -> tuple[int, ...]:
        """For each pipe, the first pipe with the same dense solution (joint mode, same rows)."""
        if self.cfg.mode != "joint":
            return tuple(range(len(grids)))
        return tuple(PIPE_SETS.index(PIPE_SETS[p]) for p in range(len(grids)))

    def _factors(self, stats: "_StatSource", set_name: str, width: int, lam: float) -> list[Factor]:
        cfg, m = self.cfg, self.pairs.d_in
        g = stats.g(set_name, width if cfg.solver == "qr" else 0)
        out = []
        for c0, c1 in _slices(m, width):
            block = g[c0:c1, c0:c1]
            try:
                f = factor_normal(block, lam) if cfg.solver == "cholesky" else factor_qr(block, lam)
            except ValueError as e:
                raise FitError(f"cannot factor the {set_name} statistics: {e}") from None
            if f.warning:
                where = f"{set_name} rows" + (f", input columns {c0}..{c1}" if width else "")
                self._warn(self._adapter, f"{where}: {f.warning}")
            out.append(f)
        return out

    # -- metrics --
    def _metrics(self, adapter: AdapterStore, grids, plan: _Plan, base: _Pass, runner: _Runner,
                 per_block: np.ndarray) -> dict | None:
        if self.cfg.holdout <= 0:
            return None
        n = self.pairs.d_out
        scales = tuple(1.0 if self.cfg.mode == "joint" else 1.0 / -(-g.d_in // g.tile_in) for g in grids)
        p = replace(base, alphas=tuple(adapter.alphas), scales=scales, sources=self._sources(grids))
        total = None
        for gi, (c0, c1) in enumerate(_groups(n, plan.metric_cols)):
            # one task per stripe: each loads its rows of the three pipes' tiles once
            chains = [[(b1 - b0, _metrics_link, p, per_block, c0, c1, b0, b1)] for b0, b1 in plan.stripes()]
            results = runner.run(chains, f"fit-metrics-g{gi}")
            acc = results[0]
            for other in results[1:]:
                acc.merge(other)
            if total is None:
                total = acc
            else:  # column groups are disjoint: sums add, row count is the same
                total.sse += acc.sse
                total.sz2 += acc.sz2
                total.m2 = np.concatenate([total.m2, acc.m2])
        sst = float(total.m2.sum())

        def score(sse: float) -> dict:
            return {"rel_err": math.sqrt(sse / total.sz2) if total.sz2 > 0 else float("nan"),
                    "r2": 1.0 - sse / sst if sst > 0 else float("nan")}

        return {"holdout_rows": int(total.rows), "pipes": [score(float(s)) for s in total.sse[:-1]],
                "combined": score(float(total.sse[-1])),
                "warnings": list(adapter.attrs()["fit"].get("warnings", []))}


def _band_runs(bands: list[int], most: int) -> list[tuple[int, int]]:
    """Runs ``[r0, r1)`` of consecutive bands, at most ``most`` bands each (solved and written together).

    >>> _band_runs([0, 1, 2, 5, 6], 2)
    [(0, 2), (2, 3), (5, 7)]
    """
    runs: list[tuple[int, int]] = []
    for r in bands:
        if runs and runs[-1][1] == r and r - runs[-1][0] < most:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _link_blocks(p: _Pass, plan: _Plan, ncols: int) -> int:
    """Row blocks per task when a stripe's accumulator travels between processes: a task reads at
    least 4× the accumulator's bytes (the chain also gives progress as its tasks finish)."""
    acc = 2 * len(p.slicings) * 8 * p.d_in * (ncols + p.d_in)
    block = 4 * plan.block_rows * (p.d_in + ncols)
    return max(1, -(-4 * acc // block))


class _StatSource:
    """The finished statistics: from memory when the pass just produced them whole, else the scratch."""

    def __init__(self, scratch: zarr.Group, slicings: tuple[int, ...]):
        self.scratch = scratch
        self.slicings = slicings
        self._mem: dict | None = None

    def keep(self, sets: dict) -> None:
        self._mem = sets

    def g(self, set_name: str, width: int) -> np.ndarray:
        k = self.slicings.index(width)
        if self._mem is not None:
            return self._mem[set_name][0][k]
        with reading("fit statistics"):
            return self.scratch[f"{set_name}_G{width}"][...]

    def b(self, set_name: str, width: int, o0: int, o1: int) -> np.ndarray:
        k = self.slicings.index(width)
        if self._mem is not None:
            return self._mem[set_name][1][k][:, o0:o1]
        with reading("fit statistics"):
            return self.scratch[f"{set_name}_B{width}"][:, o0:o1]
