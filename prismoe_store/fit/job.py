"""Phase 1: the one-shot streaming fit of the three pipes' tiles (DESIGN.md §4).

The fit reads the pairs once, reducing them to small float64 statistics per row set
(``G = XᵀX`` and ``B = XᵀZ``, or TSQR factors) — the pass, its plan, row sets and scheduling are in
:mod:`prismoe_store.fit.statistics` — then solves the ridge systems, cuts the solutions into the pipes'
tiles (this module) and scores them on held-out rows (:mod:`prismoe_store.fit.metrics`).
λ defaults to ``1e-6 · trace(G)/M`` per statistics set (:func:`solve.default_ridge`).

**Solves and pipes.** Pipe 1 fits on all training rows and pipe 3 on the same statistics with
its own grid; pipe 2 on the ``sub`` rows. ``joint``: each output band ``W_r = (G + λI)⁻¹ B_r``
over the whole input, cut into the band's tiles (one Cholesky per statistics set).
``independent``: each tile ``T = (G_cc + λI)⁻¹ B_c,r`` from its own input slice; a pipe's
prediction averages its tiles over the live input slices (per-band weights ``1/C_live``, what
:func:`prismoe_store.gates.routing.route` gives with a uniform gate and ρ = 1).

**Resumable.** The adapter's progress records mark finished statistic groups (``fit_stats``)
and solved bands (``fit_pipe1..3``); a re-run with the same settings skips them and gives a
bit-identical adapter (the plan — block rows, stripes, groups — is stored on the first run and
reused). The scratch is deleted when the fit completes (``keep_statistics`` keeps it).
>>> import numpy as np
>>> from prismoe_store.stores.pairs import PairsStore
>>> rng = np.random.default_rng(0)
>>> x = rng.standard_normal((600, 8)).astype(np.float32)
>>> w = rng.standard_normal((12, 8)).astype(np.float32)
>>> p = PairsStore.create("memory://doc-fit-pairs", d_in=8, d_out=12, rows_per_chunk=128, overwrite=True)
>>> _ = p.append(x, x @ w.T)
>>> a = fit(p, "memory://doc-fit-adapter", FitConfig(workers=4), overwrite=True)
>>> bool(np.allclose(a.dense(0), w, atol=1e-4)), a.attrs()["metrics"]["combined"]["r2"] > 0.999
(True, True)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from functools import partial

import numpy as np

from prismoe_store.errors import CorruptStoreError, DataError, FitError, GridError, StoreError, StoreFormatError
from prismoe_store.fit.config import FitConfig
from prismoe_store.fit.metrics import SOLVED, heldout_metrics
from prismoe_store.fit.plan import PANEL, Plan, col_groups, input_slices, location, make_plan, plan_block_rows
from prismoe_store.fit.runner import TICKERS, TICKERS_LOCK, Runner, make_runner, one_blas_thread, resume_note
from prismoe_store.fit.solve import (
    PIPE_SETS,
    STAT_SETS,
    Factor,
    StatSource,
    band_runs,
    default_ridge,
    factor_statistics,
    solve_panel,
)
from prismoe_store.fit.statistics import HOLD, REST, SCRATCH, SUB, WRITE_ALL, Pass, categories, link_blocks, stats_link
from prismoe_store.grid import GridSpec, plan_pipes
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import StoreOptions, create_chunked
from prismoe_store.stores.pairs import PairsStore
from prismoe_store.stores.progress import recheck
from prismoe_store.stores.records import FitRecord
from prismoe_store.stores.verified import damaged_chunks, reading

_SCRATCH_CHUNK_BYTES = 8 << 20  # target size of a chunk of the scratch B (larger ones cost fresh memory per write)
ProgressFn = Callable[[int, int], None]


# -- the public entry point ----------------------------------------------------------------


def fit(pairs: PairsStore | str, adapter_url, config: FitConfig | None = None, *, scheduler=None,
        options: StoreOptions | None = None, progress: ProgressFn | None = None,
        overwrite: bool = False, log: Callable[[str], None] | None = None) -> AdapterStore:
    """Fit the three pipes' tiles on ``pairs`` by streamed ridge least squares; write the adapter.

    ``config`` (a :class:`FitConfig`; default ``FitConfig()``) holds every setting of the fit.
    The keyword-only options say how to run it: ``scheduler``: ``"threads"`` (default),
    ``"processes"``, ``"synchronous"``, a ``tcp://`` address of a ``dask.distributed`` scheduler or
    a ``distributed.Client`` (the pairs and adapter URLs must then be readable by the workers);
    ``options``: the adapter's encoding; ``progress(done, total)``. An existing unfinished adapter
    with the same settings is resumed (``log`` gets one line saying what was done); any other
    existing store is refused unless ``overwrite``.

    Raises :class:`~prismoe_store.errors.DataError` (bad pairs, NaN/Inf rows, a bad config),
    :class:`~prismoe_store.errors.StoreError` (an existing store in the way),
    :class:`~prismoe_store.errors.FitError` (a budget too small, products that overflow).

    >>> from prismoe_store.stores.pairs import PairsStore
    >>> p = PairsStore.open("memory://doc-fit-pairs")
    >>> a = fit(p, "memory://doc-fit-indep", FitConfig(workers=4, mode="independent", holdout=0.2), overwrite=True)
    >>> a.mode, a.complete, sorted(a.attrs()["metrics"])
    ('independent', True, ['combined', 'holdout_rows', 'pipes', 'warnings'])
    """
    cfg = FitConfig() if config is None else config
    if not isinstance(cfg, FitConfig):
        raise DataError(f"config must be a FitConfig, got {type(cfg).__name__}")
    with one_blas_thread():  # for the whole fit: OpenBLAS's threads spin after each switch back to many
        return _Fit(cfg, pairs, adapter_url, scheduler, options, progress, overwrite, log).run()


class _Fit:
    """One fit run: checks, plan, statistics pass, solves, metrics (see the module docstring)."""

    def __init__(self, cfg: FitConfig, pairs, adapter_url, scheduler, options, progress, overwrite, log=None):
        self.cfg, self.overwrite, self.scheduler = cfg, overwrite, scheduler
        self.pairs = pairs if isinstance(pairs, PairsStore) else PairsStore.open(str(pairs))
        self.options = o = options or StoreOptions()  # a head adapter at adapter_url: refused (--overwrite too)
        self.adapter_url = AdapterStore.check_output(adapter_url, "ensemble", storage_options=o.storage_options)
        self.progress, self.log = progress, log
        self.timings: dict[str, float] = {}
        self._done = self._total = 0
        self._lock = threading.Lock()
        self._saving: ThreadPoolExecutor | None = None  # saves the statistics to the scratch while the solve runs
        self._writer = ThreadPoolExecutor(2, thread_name_prefix="prismoe-tiles")  # writes tiles beside the compute
        self._writing: list[tuple[Future, np.ndarray]] = []  # runs being written, and their rows
        self._solved: dict[int, np.ndarray] = {}  # pipes solved whole in one run, kept for the metrics
        self._saved: Future[None] | None = None  # its future
        self._plan: Plan | None = None  # the run's plan, once made or read back

    @property
    def plan(self) -> Plan:  # the run's plan (set before the pass starts)
        assert self._plan is not None, "the plan is made before the pass"
        return self._plan

    @staticmethod
    def record(adapter: AdapterStore) -> FitRecord:
        """The fit record of the adapter this run created or resumes (written when it was created)."""
        info = adapter.fit_record()
        if info is None:
            raise CorruptStoreError(f"{adapter.url} lost its fit record during the fit")
        return info

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

    def _count(self, p: Pass, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows per set, and held-out rows per block (checked: enough of each)."""
        block = p.block_rows
        per_block = np.zeros(-(-rows // block), np.int64)
        total = np.zeros(3, np.int64)
        for b, s in enumerate(range(0, rows, block)):
            c = np.bincount(categories(p, s, min(rows, s + block)), minlength=3)
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
        slicings: tuple[int, ...] = (0,)
        if cfg.solver == "qr" and cfg.mode == "independent":
            slicings = tuple(sorted({g.tile_in for g in grids}))
        url = location(pairs.url)
        source = {"url": url, "rows": rows, "d_in": m, "d_out": pairs.d_out}
        runner = make_runner(self.scheduler, cfg.tasks)
        run_id = uuid.uuid4().hex if runner.local else ""  # in-process tasks tick the progress per block
        try:
            adapter, plan = self._resume(grids, source)
            if adapter is not None and adapter.complete:
                return adapter
            block = plan.block_rows if plan else plan_block_rows(cfg, pairs, rows)
            base = Pass(pairs_url=url, pairs_options=None, adapter_url=self.adapter_url,
                         adapter_options=self.options.storage_options, d_in=m, holdout=cfg.holdout, seed=cfg.seed,
                         subsample=cfg.subsample, block_rows=block, precision=cfg.precision,
                         solver=cfg.solver, slicings=slicings, run_id=run_id)
            counts, per_block = self._count(base, rows)
            resumed = adapter is not None and plan is not None
            if adapter is not None and plan is not None:
                self._recheck(adapter, plan, grids, slicings, per_block)
            else:
                plan = make_plan(cfg, pairs, rows, block, cfg.tasks or runner.threads,
                                 int(per_block.max(initial=0)), len(slicings))
                adapter = AdapterStore.create(
                    self.adapter_url, grids=grids, mode=cfg.mode, alphas=cfg.alphas, options=self.options,
                    overwrite=self.overwrite,
                    attrs={"fit": FitRecord(cfg.settings(grids), source, asdict(plan)).to_dict()})
                self._create_scratch(adapter, plan, slicings)
            runner.tick = self._tick
            if run_id:
                with TICKERS_LOCK:
                    TICKERS[run_id] = self._tick
            self._plan = plan
            self._plan_progress(adapter, plan, grids, resumed=resumed)
            stats = self._statistics(adapter, plan, base, runner)
            self.timings["statistics_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            lams = self._solve(adapter, grids, stats)
            if self._saved is not None:
                self._saved.result()
            self.timings["solve_s"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            metrics = self._metrics(adapter, grids, plan, base, runner, per_block)
            while self._writing:  # the last runs' tiles were written beside the metrics
                self._writing.pop()[0].result()
            self.timings["metrics_s"] = time.perf_counter() - t2
        finally:
            self._writer.shutdown()
            if self._saving is not None:
                self._saving.shutdown()
            runner.close()
            with TICKERS_LOCK:
                TICKERS.pop(run_id, None)
        for p in range(len(grids)):
            used = counts[SUB] + (counts[REST] if PIPE_SETS[p] == "train" else 0)
            adapter.group[f"pipe{p + 1}"].attrs["rows"] = int(used)
        info = replace(self.record(adapter), ridge=lams, timings=self.timings,
                       counts={"train": int(counts[SUB] + counts[REST]), "sub": int(counts[SUB]),
                               "holdout": int(counts[HOLD])})
        adapter.update_attrs(fit=info.to_dict(), metrics=metrics)
        if not cfg.keep_statistics and SCRATCH in adapter.group:
            del adapter.group[SCRATCH]
        adapter.update_attrs(complete=True)
        return adapter

    def _warn(self, adapter: AdapterStore, msg: str) -> None:
        """Record a solver warning in the adapter at once (so a resumed run keeps it)."""
        info = self.record(adapter)
        if msg not in info.warnings:
            adapter.update_attrs(fit=replace(info, warnings=(*info.warnings, msg)).to_dict())

    def _resume(self, grids, source: dict) -> tuple[AdapterStore | None, Plan | None]:
        """The unfinished adapter to resume (with its plan), or ``(None, None)`` to create one."""
        if self.overwrite:
            return None, None
        try:
            old = AdapterStore.open(self.adapter_url, "r+", storage_options=self.options.storage_options)
        except StoreFormatError as e:  # another kind of store, or user files: never replaced
            raise StoreFormatError(f"{self.adapter_url} already exists and is not an adapter ({e}): refusing to "
                                   "replace it (--overwrite replaces only an adapter); choose another output") from None
        except StoreError:
            return None, None  # nothing there (AdapterStore.create refuses any other leftover)
        info = old.fit_record() or FitRecord()
        if old.complete:  # a finished fit: nothing to do, if it is this fit and its tiles are whole
            if info.settings != self.cfg.settings(grids) or info.pairs != source:
                what = info.differences(self.cfg.settings(grids), source)
                raise StoreError(f"{self.adapter_url} holds a finished fit with other {what} "
                                 "(pass overwrite=True / --overwrite to refit)")
            for p, g in enumerate(grids):
                bad = damaged_chunks(old.tiles(p), [c for r in range(g.rows) for _, c in old.band_chunks(p, r)])
                if bad:
                    raise CorruptStoreError(f"the finished fit in {self.adapter_url} has {len(bad)} damaged tile "
                                            f"chunk(s) in pipe {p + 1} (first {bad[0]}): refit with --overwrite")
            return old, None
        if info.settings != self.cfg.settings(grids) or info.pairs != source or info.plan is None:
            what = info.differences(self.cfg.settings(grids), source)
            raise StoreError(f"{self.adapter_url} holds an unfinished fit with other {what} "
                             "(pass overwrite=True / --overwrite to start over)")
        if SCRATCH not in old.group:
            raise StoreError(f"{self.adapter_url} holds an unfinished fit without its scratch: use --overwrite")
        return old, Plan(**info.plan)

    def _recheck(self, adapter: AdapterStore, plan: Plan, grids, slicings, per_block: np.ndarray) -> None:
        """Resuming trusts only finished work whose chunks still match their records: a statistics
        group or band with a damaged chunk (missing, torn, swapped) is done again."""
        scratch, groups = adapter.group[SCRATCH], col_groups(self.pairs.d_out, plan.group_cols)
        held = [b for b, k in enumerate(per_block) if k and self.cfg.holdout > 0]  # blocks with held-out rows

        def stat_chunks(gi: int):
            c0, c1 = groups[gi]
            for s in STAT_SETS:
                for w in slicings:
                    b = scratch[f"{s}_B{w}"]
                    yield from ((b, (0, j)) for j in range(c0 // b.chunks[1], -(-c1 // b.chunks[1])))
                    if gi == 0:
                        yield scratch[f"{s}_G{w}"], (0, 0)
            if held:
                hz = scratch["hold_z"]
                yield from ((hz, (b, 0, j)) for b in held for j in range(c0 // hz.chunks[2], -(-c1 // hz.chunks[2])))
                if gi == 0:
                    yield from ((scratch["hold_x"], (b, 0, 0)) for b in held)

        recheck(adapter.progress("fit_stats", len(groups)), lambda gi: list(stat_chunks(gi)))
        for p, grid in enumerate(grids):
            recheck(adapter.progress(f"fit_pipe{p + 1}", grid.rows), partial(adapter.band_chunks, p))

    def _create_scratch(self, adapter: AdapterStore, plan: Plan, slicings) -> None:
        m, n = self.pairs.d_in, self.pairs.d_out
        raw = StoreOptions(compressor="none", storage_options=self.options.storage_options)
        g = adapter.group.create_group(SCRATCH)
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

    def _plan_progress(self, adapter, plan: Plan, grids, resumed: bool) -> None:
        n = self.pairs.d_out
        n_groups = len(col_groups(n, plan.group_cols))
        self._total = n_groups * plan.blocks + sum(g.rows for g in grids)
        if self.cfg.holdout > 0:
            self._total += len(col_groups(n, plan.metric_cols)) * plan.blocks
        groups = len(adapter.progress("fit_stats", n_groups).done())
        bands = [(len(adapter.progress(f"fit_pipe{p + 1}", g.rows).done()), g.rows) for p, g in enumerate(grids)]
        self._done = groups * plan.blocks + sum(done for done, _ in bands)
        if resumed and self.log is not None:
            self.log(resume_note((groups, n_groups), bands))
        self._tick(0)

    # -- statistics --
    def _statistics(self, adapter: AdapterStore, plan: Plan, p: Pass, runner: Runner) -> StatSource:
        n = self.pairs.d_out
        groups = col_groups(n, plan.group_cols)
        record = adapter.progress("fit_stats", len(groups))
        scratch = adapter.group[SCRATCH]
        source = StatSource(scratch, p.slicings)
        for gi in record.missing():
            c0, c1 = groups[gi]
            with_g = gi == 0 or p.solver == "qr"  # the normal equations' G comes from the first group
            chains = []
            for b0, b1 in plan.stripes():
                # in-process: one task per stripe (ticking per block); else a chain of tasks, see link_blocks
                step = b1 - b0 if runner.local else link_blocks(p, plan, c1 - c0)
                chains.append([(0 if runner.local else min(b1, lb + step) - lb, stats_link, p, plan.rows, c0, c1,
                                lb, min(b1, lb + step), with_g, gi == 0) for lb in range(b0, b1, step)])
            results = runner.run(chains, f"fit-stats-g{gi}")
            acc = results[0]
            for other in results[1:]:
                acc.merge(other, p)
            if acc.bad is not None:
                s, e = acc.bad
                raise DataError(f"rows {s}..{e} of {self.pairs.url} hold NaN or Inf (first bad row block): "
                                "clean the pairs (prismoe collect --on-nonfinite) and re-run")
            if acc.overflow:
                raise FitError(f"the float32 products of {self.pairs.url} overflow (values near 1e19 or larger): "
                               "fit with precision float64 (--precision float64)")
            sets = acc.sets(p)

            def save(sets=sets, gi=gi, c0=c0, c1=c1) -> None:  # for a resume after the pass
                for name, (gs, bs) in sets.items():
                    for k, w in enumerate(p.slicings):
                        arr = scratch[f"{name}_B{w}"].with_config(WRITE_ALL)
                        for j0, j1 in col_groups(c1 - c0, arr.chunks[1]):  # a chunk at a time: no group-sized copy
                            arr[:, c0 + j0:c0 + j1] = bs[k][:, j0:j1]
                        if gi == 0:
                            scratch[f"{name}_G{w}"].with_config(WRITE_ALL)[...] = gs[k]
                record.mark(gi)

            if len(groups) == 1:  # the solve reads them from memory: saved while it runs (joined by run)
                source.keep(sets)
                self._saving = ThreadPoolExecutor(1, thread_name_prefix="prismoe-stats")
                self._saved = self._saving.submit(save)
            else:
                save()
        return source

    # -- solves --
    def _solve(self, adapter: AdapterStore, grids, stats: StatSource) -> dict[str, float]:
        cfg, m = self.cfg, self.pairs.d_in
        lams = dict(self.record(adapter).ridge or {})
        for s in STAT_SETS:
            if s not in lams:
                g0 = stats.g(s, stats.slicings[0])
                trace = float(np.trace(g0)) if cfg.solver == "cholesky" else float(np.sum(g0 * g0))
                lams[s] = float(cfg.ridge) if cfg.ridge is not None else default_ridge(trace, m)
        adapter.update_attrs(fit=replace(self.record(adapter), ridge=lams).to_dict())
        self._adapter = adapter
        sources = self._sources(grids)
        factors = self._all_factors(grids, stats, lams, sources)
        kept: dict[int, tuple[int, np.ndarray]] = {}  # a copied pipe's last run, in memory: (first output row, rows)
        assert self._writer is not None, "run() opens the tile writer"
        for p, grid in enumerate(grids):  # writes overlap the next solve, and the last ones the metrics
            self._solve_pipe(p, grid, stats, lams, factors, sources, kept, self._writing, self._writer)
        return lams

    def _solve_pipe(self, p: int, grid: GridSpec, stats: StatSource, lams: dict, factors: dict,
                    sources: tuple[int, ...], kept: dict, writing: list, writer: ThreadPoolExecutor) -> None:
        cfg, m, n, adapter = self.cfg, self.pairs.d_in, self.pairs.d_out, self._adapter
        record = adapter.progress(f"fit_pipe{p + 1}", grid.rows)
        set_name, a = PIPE_SETS[p], grid.tile_out
        width = 0 if cfg.mode == "joint" else grid.tile_in
        src = adapter.tiles(sources[p])  # read a copied pipe's rows back from here
        for r0, r1 in band_runs(record.missing(), max(1, self.plan.group_cols // a)):
            o0, o1 = r0 * a, min(n, r1 * a)  # o1 <= o0: output padding only, written as zeros
            block = np.zeros(((r1 - r0) * a, grid.d_in_pad), np.float32)
            mem = kept.get(sources[p])
            if o1 > o0 and sources[p] != p and mem is not None and mem[0] <= o0 and o1 <= mem[0] + len(mem[1]):
                block[: o1 - o0, :m] = mem[1][o0 - mem[0]:o1 - mem[0], :m]  # the same dense solution, in memory
            elif o1 > o0 and sources[p] != p:  # the same dense solution, already written: copy it
                for w, _ in writing:
                    w.result()
                with reading(f"tiles of pipe {sources[p] + 1} in {self.adapter_url}"):
                    block[: o1 - o0, :m] = src[o0:o1, :m]
            elif o1 > o0:
                key = (set_name, width)
                assert key in factors, "the factors of every missing band are made before the solves"
                # solved in whole panels of fixed columns: a column's bits do not depend on the runs
                p0, p1 = o0 // PANEL * PANEL, min(n, -(-o1 // PANEL) * PANEL)
                rhs = stats.b(set_name, width if cfg.solver == "qr" else 0, p0, p1)
                with one_blas_thread() as pool:  # one product per panel, spread over the cores
                    jobs = [pool.submit(solve_panel, f, rhs, block, o0, o1, p0, c0, c1, q0, min(p1, q0 + PANEL))
                            for (c0, c1), f in zip(input_slices(m, width), factors[key]) for q0 in range(p0, p1, PANEL)]
                    for job in jobs:
                        job.result()
            if p in sources[p + 1:]:
                kept[p] = (o0, block)
            if sources[p] == p and r0 == 0 and r1 == grid.rows:  # the whole pipe in one run: for the metrics
                self._solved[p] = block
            # one run in flight, unless the others' rows are kept anyway (memory: at most two runs besides those)
            held = [id(b) for _, b in kept.values()] + [id(b) for b in self._solved.values()]
            for w, b in list(writing):
                if id(b) not in held or w.done():
                    w.result()  # waits, or raises what the write raised
                    writing.remove((w, b))
            writing.append((writer.submit(self._write_run, p, record, block, r0, r1, a), block))

    def _write_run(self, p: int, record, block: np.ndarray, r0: int, r1: int, a: int) -> None:
        """Write bands ``r0:r1`` of pipe ``p`` (every chunk, zero tiles too; tiles wholly in padding never)."""
        step = max(1, (_SCRATCH_CHUNK_BYTES // max(1, block[:a].nbytes)))  # bands a write: no run-sized copy
        for s0 in range(r0, r1, step):
            s1 = min(r1, s0 + step)
            self._adapter.write_bands(p, s0, s1, block[(s0 - r0) * a:(s1 - r0) * a])
        record.mark_many(range(r0, r1))
        self._tick(r1 - r0)

    def _sources(self, grids) -> tuple[int, ...]:
        """For each pipe, the first pipe with the same dense solution (joint mode, same rows)."""
        if self.cfg.mode != "joint":
            return tuple(range(len(grids)))
        return tuple(PIPE_SETS.index(PIPE_SETS[p]) for p in range(len(grids)))

    def _factors(self, stats: StatSource, set_name: str, width: int, lam: float) -> tuple[list[Factor], list]:
        """Factor one set's ridge systems (on the calling thread; warnings returned, not recorded)."""
        cfg, g = self.cfg, stats.g(set_name, width if self.cfg.solver == "qr" else 0)
        try:
            return factor_statistics(g, input_slices(self.pairs.d_in, width), lam, solver=cfg.solver,
                                     floor_rows=self.plan.block_rows if cfg.precision == "mixed" else 0)
        except ValueError as e:
            raise FitError(f"cannot factor the {set_name} statistics: {e}") from None

    def _all_factors(self, grids, stats: StatSource, lams: dict, sources: tuple[int, ...]) -> dict[tuple, list]:
        """The factors the missing bands need, computed side by side (one BLAS thread each: a
        multi-threaded LAPACK call stalls beside the threads that write), warnings recorded."""
        width = {p: 0 if self.cfg.mode == "joint" else g.tile_in for p, g in enumerate(grids)}
        missing = {p: self._adapter.progress(f"fit_pipe{p + 1}", g.rows).missing() for p, g in enumerate(grids)}
        keys = {(PIPE_SETS[p], width[p]) for p, g in enumerate(grids)
                if sources[p] == p and any(r * g.tile_out < self.pairs.d_out for r in missing[p])}
        with one_blas_thread() as pool:
            jobs = {key: pool.submit(self._factors, stats, *key, lams[key[0]]) for key in sorted(keys)}
            done = {key: job.result() for key, job in jobs.items()}
        for (set_name, w), (_, warnings) in done.items():
            for (c0, c1), warning in warnings:
                where = f"{set_name} rows" + (f", input columns {c0}..{c1}" if w else "")
                self._warn(self._adapter, f"{where}: {warning}")
        return {key: fs for key, (fs, _) in done.items()}

    # -- metrics --
    def _metrics(self, adapter: AdapterStore, grids, plan: Plan, base: Pass, runner: Runner,
                 per_block: np.ndarray) -> dict | None:
        if self.cfg.holdout <= 0:
            return None
        scales = tuple(1.0 if self.cfg.mode == "joint" else 1.0 / -(-g.d_in // g.tile_in) for g in grids)
        p = replace(base, alphas=tuple(adapter.alphas), scales=scales, sources=self._sources(grids))
        if p.run_id and len(col_groups(self.pairs.d_out, plan.metric_cols)) == 1 \
                and set(p.sources) <= set(self._solved):  # in-process: the tiles just solved, not read back
            SOLVED[p.run_id] = {q: self._solved[q][: self.pairs.d_out, : p.d_in] for q in set(p.sources)}
        try:
            return heldout_metrics(p, plan, runner, per_block, self.pairs.d_out, self.record(adapter).warnings)
        finally:
            SOLVED.pop(p.run_id, None)
