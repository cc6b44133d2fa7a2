"""The one-shot streaming fit against numpy references (lstsq, closed-form ridge, per-tile lstsq)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prismoe_store.errors import CorruptStoreError, DataError, FitError, GridError, StoreError
from prismoe_store.fit import FitConfig, fit
from prismoe_store.fit.config import SUBSAMPLE_SEED_OFFSET
from prismoe_store.fit.solve import factor_normal, factor_qr, qr_update
from prismoe_store.grid import plan_grid, plan_pipes
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore, holdout_mask, row_uniform
from prismoe_store.stores.verified import check_stored

S, M, N = 1500, 20, 28  # small: odd widths, so every grid pads
WORKERS = 8


def make_pairs(path, *, rows=S, d_in=M, d_out=N, seed=0, noise=0.1, x=None, rows_per_chunk=128):
    """Well-conditioned linear pairs written with PairsStore.append (in a few appends)."""
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.standard_normal((rows, d_in)).astype(np.float32)
    w = rng.standard_normal((d_out, x.shape[1]))
    z = (x.astype(np.float64) @ w.T + noise * rng.standard_normal((x.shape[0], d_out))).astype(np.float32)
    store = PairsStore.create(str(path), d_in=x.shape[1], d_out=d_out, rows_per_chunk=rows_per_chunk)
    for s in range(0, x.shape[0], 500):
        store.append(x[s:s + 500], z[s:s + 500])
    return store, x.astype(np.float64), z.astype(np.float64)


def split(rows, *, seed=0, holdout=0.1, subsample=0.6):
    """The documented row sets: held out, all training rows, pipe 2's subsample."""
    hold = holdout_mask(seed, 0, rows, holdout) if holdout > 0 else np.zeros(rows, bool)
    sub = ~hold & (row_uniform(seed + SUBSAMPLE_SEED_OFFSET, 0, rows) < subsample)
    return hold, ~hold, sub


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def lstsq(x, z):
    return np.linalg.lstsq(x, z, rcond=None)[0].T  # [d_out, d_in]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs") / "p")


# -- exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["cholesky", "qr"])
def test_joint_equals_lstsq(pairs, tmp_path, solver):
    store, x, z = pairs
    _, train, sub = split(S)
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, ridge=0.0, solver=solver, tasks=2))
    assert a.complete and a.mode == "joint"
    assert rel(a.dense(0), lstsq(x[train], z[train])) <= 1e-5
    assert rel(a.dense(1), lstsq(x[sub], z[sub])) <= 1e-5
    assert np.array_equal(a.dense(2), a.dense(0))  # pipe 3: same rows, its own grid, the same product
    assert a.grids == list(plan_pipes(M, N, WORKERS))
    for p in range(len(a.grids)):  # padding stays zero
        t = a.tiles(p)[...]
        assert not t[N:].any() and not t[:, M:].any()
        assert a.group[f"pipe{p + 1}"].attrs["rows"] == int((sub if p == 1 else train).sum())


def test_default_ridge_is_close_to_lstsq(pairs, tmp_path):
    store, x, z = pairs
    _, train, _ = split(S)
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS))
    lam = a.attrs()["fit"]["ridge"]["train"]
    assert lam == pytest.approx(1e-6 * np.trace(x[train].T @ x[train]) / M, rel=1e-5)
    assert rel(a.dense(0), lstsq(x[train], z[train])) <= 1e-5


@pytest.mark.parametrize("solver", ["cholesky", "qr"])
def test_ridge_equals_closed_form(pairs, tmp_path, solver):
    store, x, z = pairs
    _, train, sub = split(S)
    lam = 50.0
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, ridge=lam, solver=solver))
    for p, rows in ((0, train), (1, sub)):
        xs, zs = x[rows], z[rows]
        ref = np.linalg.solve(xs.T @ xs + lam * np.eye(M), xs.T @ zs).T
        assert rel(a.dense(p), ref) <= 1e-5
    assert a.attrs()["fit"]["ridge"] == {"train": lam, "sub": lam}


@pytest.mark.parametrize("solver", ["cholesky", "qr"])
def test_independent_equals_per_tile_lstsq(pairs, tmp_path, solver):
    store, x, z = pairs
    _, train, sub = split(S)
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, mode="independent", ridge=0.0, solver=solver))
    assert a.mode == "independent"
    for p, g in enumerate(a.grids):
        rows = sub if p == 1 else train
        for j in range(g.workers):
            (o0, o1), (c0, c1) = [(s.start, s.stop) for s in g.valid_region(j)]
            tile = a.read_tile(p, j)
            if o1 <= o0 or c1 <= c0:
                assert not tile.any()  # wholly padding
                continue
            ref = lstsq(x[rows][:, c0:c1], z[rows][:, o0:o1])
            assert rel(tile[: o1 - o0, : c1 - c0], ref) <= 1e-5
            assert not tile[o1 - o0:].any() and not tile[:, c1 - c0:].any()


def test_rank_deficient_x_still_solves(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((S, 12)).astype(np.float32)
    x = np.concatenate([base, np.zeros((S, 3), np.float32), base[:, :3], np.ones((S, 1), np.float32),
                        np.ones((S, 1), np.float32)], axis=1)  # zero, duplicate and constant columns
    store, x64, z64 = make_pairs(tmp_path / "p", x=x, d_out=9)
    _, train, _ = split(S)
    for solver in ("cholesky", "qr"):
        for mode in ("joint", "independent"):
            a = fit(store, tmp_path / f"a-{solver}-{mode}", FitConfig(workers=4, mode=mode, solver=solver))
            for p, g in enumerate(a.grids):
                assert np.isfinite(a.tiles(p)[...]).all()
                # every chunk is stored, all-zero tiles (dead input slices, padding) included
                check_stored(a.tiles(p), slice(0, g.d_out_pad), slice(0, g.d_in_pad), f"pipe {p}")
            if mode == "joint":  # the default ridge gives (nearly) the minimum-norm lstsq solution
                ref = lstsq(x64[train], z64[train])
                assert rel(a.dense(0), ref) <= 1e-4
                assert rel(x64 @ a.dense(0).T, x64 @ ref.T) <= 1e-5


def test_failed_cholesky_falls_back_with_a_warning(tmp_path):
    x = np.zeros((400, 6), np.float32)
    x[:, :2] = np.random.default_rng(0).standard_normal((400, 2))
    store, x64, z64 = make_pairs(tmp_path / "p", x=x, d_out=5)
    _, train, _ = split(400)
    a = fit(store, tmp_path / "a", FitConfig(workers=4, ridge=0.0))  # singular G and no ridge
    warnings = a.attrs()["metrics"]["warnings"]
    assert warnings and "eigh" in warnings[0]
    assert rel(a.dense(0), lstsq(x64[train], z64[train])) <= 1e-5  # the minimum-norm solution


def test_qr_beats_normal_equations_on_ill_conditioned_x(tmp_path):
    rng = np.random.default_rng(5)
    u, _ = np.linalg.qr(rng.standard_normal((S, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    x = ((u * np.logspace(0, -4, 8)) @ v.T * 40).astype(np.float32)  # cond(X) ≈ 1e4, cond(G) ≈ 1e8
    store, x64, z64 = make_pairs(tmp_path / "p", x=x, d_out=6, noise=0.0)
    _, train, _ = split(S)
    ref = lstsq(x64[train], z64[train])
    err = {}
    for solver in ("cholesky", "qr"):  # float32 products: float64 ones solve cond(G) ≈ 1e8 as well as QR
        a = fit(store, tmp_path / solver, FitConfig(workers=4, ridge=0.0, solver=solver, precision="float32"))
        err[solver] = rel(a.dense(0), ref)
    assert err["qr"] <= 1e-5
    assert err["qr"] < err["cholesky"] / 10


def test_float64_products(pairs, tmp_path):
    store, x, z = pairs
    _, train, _ = split(S)
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, ridge=0.0, precision="float64"))
    assert rel(a.dense(0), lstsq(x[train], z[train])) <= 1e-6


# -- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_holdout_metrics_equal_numpy(pairs, tmp_path, mode):
    store, x, z = pairs
    hold, _, _ = split(S, seed=4, holdout=0.2)
    alphas = (0.5, 0.3, 0.2)
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, mode=mode, seed=4, holdout=0.2, alphas=alphas))
    xh, zh = x[hold], z[hold]
    ys = []
    for p, g in enumerate(a.grids):
        scale = 1.0 if mode == "joint" else 1.0 / -(-M // g.tile_in)  # independent: tiles averaged per band
        ys.append(xh @ (a.dense(p).astype(np.float64) * scale).T)
    sst = ((zh - zh.mean(0)) ** 2).sum()

    def ref(y):
        return {"rel_err": np.linalg.norm(y - zh) / np.linalg.norm(zh), "r2": 1 - ((y - zh) ** 2).sum() / sst}

    m = a.attrs()["metrics"]
    assert m["holdout_rows"] == int(hold.sum())
    for got, y in zip(m["pipes"] + [m["combined"]], ys + [sum(al * y for al, y in zip(alphas, ys))]):
        want = ref(y)
        assert got["rel_err"] == pytest.approx(want["rel_err"], rel=1e-5)
        assert got["r2"] == pytest.approx(want["r2"], rel=1e-6)
    if mode == "joint":
        assert m["pipes"][0]["r2"] > 0.99


def test_no_holdout_means_no_metrics(pairs, tmp_path):
    store, x, z = pairs
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, holdout=0.0, ridge=0.0, subsample=1.0))
    assert a.attrs()["metrics"] is None
    assert rel(a.dense(0), lstsq(x, z)) <= 1e-5
    assert np.array_equal(a.dense(1), a.dense(0))  # subsample 1.0: pipe 2 sees every row


# -- out of core, schedulers, resume -----------------------------------------------------------


def test_spilled_b_gives_the_same_adapter(pairs, tmp_path):
    store, _, _ = pairs
    whole = fit(store, tmp_path / "whole", FitConfig(workers=WORKERS, block_rows=256, tasks=2))
    small = fit(store, tmp_path / "small",
                FitConfig(workers=WORKERS, block_rows=256, tasks=2, memory_budget=150_000, keep_statistics=True))
    plan = small.attrs()["fit"]["plan"]
    assert plan["group_cols"] < N  # several column groups: B spilled to the scratch
    assert small.progress("fit_stats", -(-N // plan["group_cols"])).complete()
    assert "_fit" in small.group and "_fit" not in whole.group
    for p in range(3):
        np.testing.assert_allclose(small.dense(p), whole.dense(p), rtol=1e-6, atol=1e-6)
    for k in ("pipes", "combined"):
        assert json.dumps(small.attrs()["metrics"][k])[:40] == json.dumps(whole.attrs()["metrics"][k])[:40]


def test_budget_too_small_is_a_clear_error(pairs, tmp_path):
    with pytest.raises(FitError, match="memory budget"):
        fit(pairs[0], tmp_path / "a", FitConfig(workers=WORKERS, memory_budget=1000))


def test_threads_and_local_cluster_give_the_same_adapter(pairs, tmp_path):
    distributed = pytest.importorskip("distributed")
    store, _, _ = pairs
    a = fit(store, tmp_path / "threads", FitConfig(workers=WORKERS, tasks=2, block_rows=256))
    seen = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        address = cluster.scheduler_address  # tcp://127.0.0.1:PORT, what `--scheduler` takes
        b = fit(store, tmp_path / "cluster", FitConfig(workers=WORKERS, block_rows=256), scheduler=address,
                progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1]
    assert b.attrs()["fit"]["plan"]["tasks"] == 2
    for p in range(3):
        assert np.array_equal(a.dense(p), b.dense(p))
    assert a.attrs()["metrics"] == b.attrs()["metrics"]


def test_local_cluster_of_processes_gives_the_same_tiles(pairs, tmp_path):
    """Stripes accumulated in two worker processes (the statistics travel pickled) give the tiles of threads."""
    distributed = pytest.importorskip("distributed")
    store, _, _ = pairs
    a = fit(store, tmp_path / "threads", FitConfig(workers=WORKERS, tasks=2, block_rows=256))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        b = fit(store, tmp_path / "cluster", FitConfig(workers=WORKERS, block_rows=256),
                scheduler=cluster.scheduler_address)
    assert b.attrs()["fit"]["plan"]["tasks"] == 2
    for p in range(3):
        assert np.array_equal(a.dense(p), b.dense(p))
    assert a.attrs()["metrics"] == b.attrs()["metrics"]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(block=st.sampled_from([128, 256, 384, 1500]), tasks=st.integers(1, 4), spill=st.booleans())
def test_any_blocking_gives_the_same_fit(pairs, tmp_path_factory, block, tasks, spill):
    """Row blocks, stripes and column groups change only the rounding, never the row sets."""
    store, x, z = pairs
    hold, train, _ = split(S)
    # a budget for one task and ~10 columns of B: G (20·M² bytes), blocks (12·block·M), per column 20·M + 12·block
    # (float32 products; float64 ones add 8 bytes per block value: test_spilled_b_gives_the_same_adapter)
    budget = 20 * M * M + 12 * block * M + 10 * (20 * M + 12 * block) if spill else None
    config = FitConfig(workers=WORKERS, ridge=0.0, block_rows=block, tasks=tasks, memory_budget=budget,
                       precision="float32")
    a = fit(store, tmp_path_factory.mktemp("a") / "a", config)
    if spill:
        assert a.attrs()["fit"]["plan"]["group_cols"] < N
    assert a.attrs()["fit"]["counts"] == {"train": int(train.sum()), "sub": a.attrs()["fit"]["counts"]["sub"],
                                          "holdout": int(hold.sum())}
    assert rel(a.dense(0), lstsq(x[train], z[train])) <= 1e-5


def test_synchronous_scheduler_and_task_count(pairs, tmp_path):
    store, _, _ = pairs
    a = fit(store, tmp_path / "a", FitConfig(workers=WORKERS, tasks=3, block_rows=128), scheduler="synchronous")
    b = fit(store, tmp_path / "b", FitConfig(workers=WORKERS, tasks=1, block_rows=128))
    np.testing.assert_allclose(a.dense(0), b.dense(0), rtol=1e-6, atol=1e-6)


class _Kill(Exception):
    pass


def _killer(after: int):
    calls = {"n": 0}

    def progress(done, total):
        calls["n"] += 1
        if calls["n"] > after:
            raise _Kill()
    return progress


@pytest.mark.parametrize("kill_after", [3, 14, 30])  # during the pass, during the solves, late in the solves
def test_resume_gives_the_same_adapter(pairs, tmp_path, kill_after):
    store, _, _ = pairs
    kw = dict(config=FitConfig(workers=WORKERS, block_rows=128, tasks=2, memory_budget=80_000), scheduler="synchronous")
    ref = fit(store, tmp_path / "ref", **kw)
    with pytest.raises(_Kill):
        fit(store, tmp_path / "a", progress=_killer(kill_after), **kw)
    part = AdapterStore.open(tmp_path / "a")
    assert not part.complete
    plan = part.attrs()["fit"]["plan"]
    groups = -(-N // plan["group_cols"])
    done = len(part.progress("fit_stats", groups).done()) * -(-S // plan["block_rows"])
    done += sum(len(part.progress(f"fit_pipe{p + 1}", g.rows).done()) for p, g in enumerate(part.grids))
    assert (done > 0) == (kill_after > 3)
    seen = []
    a = fit(store, tmp_path / "a", progress=lambda d, t: seen.append((d, t)), **kw)
    assert a.complete
    assert seen[0][0] == done  # finished groups and bands were not redone
    for p in range(3):
        assert np.array_equal(a.dense(p), ref.dense(p))
    assert a.attrs()["metrics"] == ref.attrs()["metrics"]


def test_resume_after_a_kill_in_the_solves_of_a_one_group_fit(pairs, tmp_path):
    """One column group: the solve reads the statistics from memory while they are saved to the
    scratch in a thread; a kill during the solves still leaves them saved, and resuming redoes
    neither the pass nor the finished bands."""
    store, _, _ = pairs
    kw = {"config": FitConfig(workers=WORKERS, block_rows=128), "scheduler": "threads"}
    seen = []
    ref = fit(store, tmp_path / "ref", progress=lambda d, t: seen.append((d, t)), **kw)
    assert ref.attrs()["fit"]["plan"]["group_cols"] == N  # one group
    blocks = -(-S // 128)
    first_solve = next(i for i, (d, _) in enumerate(seen) if d > blocks)
    with pytest.raises(_Kill):
        fit(store, tmp_path / "a", progress=_killer(first_solve), **kw)
    part = AdapterStore.open(tmp_path / "a")
    assert part.progress("fit_stats", 1).done() == [0]
    bands = sum(len(part.progress(f"fit_pipe{p + 1}", g.rows).done()) for p, g in enumerate(part.grids))
    assert bands > 0
    again = []
    a = fit(store, tmp_path / "a", progress=lambda d, t: again.append((d, t)), **kw)
    assert again[0][0] == blocks + bands
    for p in range(3):
        assert np.array_equal(a.dense(p), ref.dense(p))
    assert a.attrs()["metrics"] == ref.attrs()["metrics"]


def test_progress_reaches_total(pairs, tmp_path):
    seen = []
    fit(pairs[0], tmp_path / "a", FitConfig(workers=WORKERS), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] > 0
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))


# -- bad input -------------------------------------------------------------------------------


def test_existing_adapter_is_refused(pairs, tmp_path):
    store, _, _ = pairs
    fit(store, tmp_path / "a", FitConfig(workers=WORKERS))
    assert fit(store, tmp_path / "a", FitConfig(workers=WORKERS)).complete  # the same fit: a checked no-op (see above)
    with pytest.raises(StoreError, match="finished fit with other settings"):
        fit(store, tmp_path / "a", FitConfig(workers=WORKERS, mode="independent"))
    fit(store, tmp_path / "a", FitConfig(workers=WORKERS, mode="independent"), overwrite=True)
    assert AdapterStore.open(tmp_path / "a").mode == "independent"
    with pytest.raises(StoreError, match="not an adapter"):
        fit(store, store.url, FitConfig(workers=WORKERS))  # the pairs store itself
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="already exists"):
        fit(store, tmp_path / "junk", FitConfig(workers=WORKERS))


def test_overwrite_keeps_the_users_own_files_in_a_store_folder(pairs, tmp_path):
    """--overwrite replaces a store, not a file the user put inside its folder: refused, nothing lost."""
    from cli.main import main

    store, _, _ = pairs
    fit(store, tmp_path / "a", FitConfig(workers=WORKERS))
    (tmp_path / "a" / "NOTES.md").write_text("mine")
    (tmp_path / "a" / "results").mkdir()
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    run = CliRunner().invoke(main, ["fit", store.url, "-o", str(tmp_path / "a"), "--workers", str(WORKERS),
                                    "--mode", "independent", "--overwrite", "--quiet"])
    assert run.exit_code == 1 and run.output.count("\n") == 1, run.output
    assert "NOTES.md, results" in run.output and "move them out" in run.output
    assert (tmp_path / "a" / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
    assert AdapterStore.open(tmp_path / "a").mode == "joint"  # the old adapter is untouched
    (tmp_path / "a" / "NOTES.md").unlink()
    (tmp_path / "a" / "results").rmdir()
    fit(store, tmp_path / "a", FitConfig(workers=WORKERS, mode="independent"), overwrite=True)
    assert AdapterStore.open(tmp_path / "a").mode == "independent"


def test_unfinished_adapter_with_other_settings_is_refused(pairs, tmp_path):
    store, _, _ = pairs
    with pytest.raises(_Kill):
        fit(store, tmp_path / "a", FitConfig(workers=WORKERS), progress=_killer(2))
    with pytest.raises(StoreError, match="other settings"):
        fit(store, tmp_path / "a", FitConfig(workers=WORKERS, ridge=3.0))


def test_nan_is_reported_with_its_row_block(tmp_path):
    x = np.random.default_rng(0).standard_normal((600, 5)).astype(np.float32)
    x[333, 2] = np.nan
    store, _, _ = make_pairs(tmp_path / "p", x=x, d_out=3)
    with pytest.raises(DataError, match=r"rows 256\.\.384 .* NaN or Inf"):
        fit(store, tmp_path / "a", FitConfig(workers=4, block_rows=128, tasks=2))
    z_inf = PairsStore.create(str(tmp_path / "q"), d_in=5, d_out=3, rows_per_chunk=128)
    z = np.ones((600, 3), np.float32)
    z[590] = np.inf
    z_inf.append(np.ones((600, 5), np.float32), z)
    with pytest.raises(DataError, match=r"rows 512\.\.600"):
        fit(z_inf, tmp_path / "b", FitConfig(workers=4, block_rows=128))


def test_float32_overflow_is_a_clear_error(tmp_path):
    """Finite rows whose float32 products overflow are not mistaken for NaN/Inf rows; float64 fits them."""
    x = (np.random.default_rng(1).standard_normal((600, 5)) * 1e19).astype(np.float32)
    store, _, _ = make_pairs(tmp_path / "p", x=x, d_out=3)
    with pytest.raises(FitError, match="overflow.*--precision float64"):
        fit(store, tmp_path / "a", FitConfig(workers=4, block_rows=128))
    a = fit(store, tmp_path / "b", FitConfig(workers=4, block_rows=128, precision="float64"))
    assert all(np.isfinite(a.dense(p)).all() for p in range(3))


def test_mismatched_row_counts(tmp_path):
    store, _, _ = make_pairs(tmp_path / "p", rows=300)
    store.z.resize((200, N))  # a hand-damaged store: z shorter than the committed rows
    with pytest.raises(DataError, match="mismatched row counts"):
        fit(PairsStore.open(store.url), tmp_path / "a", FitConfig(workers=WORKERS))


def test_too_few_rows(tmp_path):
    store, _, _ = make_pairs(tmp_path / "p", rows=3)
    with pytest.raises(DataError, match="no held-out row"):
        fit(store, tmp_path / "a", FitConfig(workers=WORKERS, holdout=0.01))
    one = PairsStore.create(str(tmp_path / "one"), d_in=M, d_out=N)
    one.append(np.ones((1, M)), np.ones((1, N)))
    with pytest.raises(DataError, match="at least 2"):
        fit(one, tmp_path / "b", FitConfig(workers=WORKERS))


def test_grid_must_match_the_pairs(pairs, tmp_path):
    g = plan_grid(M + 1, N, WORKERS)
    with pytest.raises(GridError, match="pipe 1 covers"):
        fit(pairs[0], tmp_path / "a", FitConfig(grids=[g, g, g]))
    with pytest.raises(GridError, match="three"):
        FitConfig(grids=(plan_grid(M, N, 4),))


@pytest.mark.parametrize("bad", [dict(mode="both"), dict(holdout=1.0), dict(subsample=0.0), dict(ridge=-1.0),
                                 dict(solver="svd"), dict(alphas=(0.5, 0.5, 0.5)), dict(tasks=0),
                                 dict(workers=12), dict(precision="float16")])
def test_config_is_validated(bad):
    with pytest.raises((DataError, GridError)):
        FitConfig(**bad)


def test_unknown_scheduler(pairs, tmp_path):
    with pytest.raises(DataError, match="scheduler"):
        fit(pairs[0], tmp_path / "a", scheduler="gpu")


# -- the solver helpers --------------------------------------------------------------------


def test_solver_helpers_against_numpy():
    rng = np.random.default_rng(1)
    x, z = rng.standard_normal((300, 7)), rng.standard_normal((300, 4))
    ref = np.linalg.solve(x.T @ x + 2.0 * np.eye(7), x.T @ z)
    np.testing.assert_allclose(factor_normal(x.T @ x, 2.0).solve(x.T @ z), ref, rtol=1e-10)
    r, qz = np.zeros((7, 7)), np.zeros((7, 4))
    for s in range(0, 300, 41):  # streamed in uneven blocks
        r, qz = qr_update(r, qz, x[s:s + 41], z[s:s + 41])
    np.testing.assert_allclose(factor_qr(r, 2.0).solve(qz), ref, rtol=1e-10)
    np.testing.assert_allclose(np.abs(r), np.abs(np.linalg.qr(x)[1]), atol=1e-10)


def test_refitting_a_finished_fit_checks_it_and_does_nothing(pairs, tmp_path):
    """The same fit again: the finished adapter, untouched; other settings: refused; a damaged tile
    of a finished fit (whose statistics are gone): refused, naming --overwrite."""
    store, _, _ = pairs
    cfg = FitConfig(workers=WORKERS)
    a = fit(store, tmp_path / "a", cfg)
    files = sorted(p for p in (tmp_path / "a").rglob("*") if p.is_file())
    stamps = [(p.stat().st_mtime_ns, p.read_bytes()) for p in files]
    again = fit(store, tmp_path / "a", cfg)
    assert again.complete and [(p.stat().st_mtime_ns, p.read_bytes()) for p in files] == stamps
    for p in range(3):
        assert np.array_equal(again.dense(p), a.dense(p))
    with pytest.raises(StoreError, match=r"finished fit with other settings \(ridge\)"):
        fit(store, tmp_path / "a", FitConfig(workers=WORKERS, ridge=0.5))
    chunk = next(p for p in sorted((tmp_path / "a" / "pipe2" / "tiles" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(CorruptStoreError, match="damaged tile chunk.*pipe 2.*--overwrite"):
        fit(store, tmp_path / "a", cfg)


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_fit(pairs, tmp_path):
    from cli.main import main

    store, _, _ = pairs
    out = tmp_path / "a"
    res = CliRunner().invoke(main, ["fit", store.url, "-o", str(out), "--workers", str(WORKERS), "--json", "-q",
                                    "--holdout", "0.2", "--mode", "independent", "--ridge", "0.5"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["adapter"] == str(out) and info["mode"] == "independent"
    assert info["metrics"]["combined"]["r2"] > 0.5
    assert AdapterStore.open(out).attrs()["fit"]["ridge"]["train"] == 0.5
    res = CliRunner().invoke(main, ["fit", store.url, "-o", str(out), "--workers", str(WORKERS), "-q"])
    assert res.exit_code == 1 and "finished fit with other settings" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["fit", store.url, "-o", str(out), "--workers", str(WORKERS), "-q",
                                    "--holdout", "0.2", "--mode", "independent", "--ridge", "0.5"])
    assert res.exit_code == 0 and "already finished, nothing to do" in res.output and "R²" in res.output
    assert "ridge λ: train 0.5 (all training rows: pipes 1, 3), sub 0.5 (pipe 2's subsample): given (--ridge)" \
        in res.output
    rows = store.rows
    res = CliRunner().invoke(main, ["fit", str(out), "-o", store.url, "--workers", str(WORKERS), "-q"])  # swapped
    assert res.exit_code == 1 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert "is an adapter store, not a pairs store, but" in res.output and "give the pairs first" in res.output
    assert PairsStore.open(store.url).rows == rows  # and the pairs are left as they were
    res = CliRunner().invoke(main, ["fit", str(out), "-o", str(tmp_path / "new"), "-q"])  # no pairs at all: no hint
    assert res.exit_code == 1 and "give the pairs first" not in res.output
    res = CliRunner().invoke(main, ["fit", store.url, "-o", str(out), "--workers", str(WORKERS), "-q", "--overwrite"])
    assert res.exit_code == 0 and "R²" in res.output
    lams = AdapterStore.open(out).attrs()["fit"]["ridge"]  # the default: 1e-6·trace(G)/M, named as such
    assert (f"ridge λ: train {lams['train']:.3g} (all training rows: pipes 1, 3), sub {lams['sub']:.3g} "
            "(pipe 2's subsample): 1e-6 · trace(XᵀX)/d_in of each row set") in res.output


# -- the benchmark command ---------------------------------------------------------------------


def test_benchmark_fit_runs_the_whole_command(tmp_path):
    """`prismoe benchmark fit` runs `prismoe fit` in fresh processes; its report is self-consistent
    (the FLOP counts of the rows the fits saw, stages within each run's wall time)."""
    from click.testing import CliRunner

    from cli.main import main
    from prismoe_store.bench.fit import fit_flops

    res = CliRunner().invoke(main, ["benchmark", "fit", "--rows", "512,1024", "--d-in", "16", "--d-out", "32",
                                    "--workers", "4", "--repeats", "2", "--workdir", str(tmp_path / "w"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert [x["rows"] for x in r["runs"]] == [512, 1024, 512, 1024]  # interleaved repeats
    for run in r["runs"]:
        assert run["plan"]["rows"] == run["rows"] and run["peak_rss_mb"] > 10
        assert 0 < sum(v for k, v in run["stages"].items() if k != "rest") < run["fit_s"]
        assert sum(run["counts"][k] for k in ("train", "holdout")) == run["rows"]
        all_fl = run["fit_gflops"] * 1e9 * run["fit_s"]
        assert all_fl == pytest.approx(fit_flops(16, 32, run["counts"])[1])
        assert run["flop_ratio"] == pytest.approx(run["fit_gflops"] / run["matmul_gflops"])
    assert [b["rows"] for b in r["best"]] == [512, 1024]
    assert r["rss_ratio"] > 0 and not (tmp_path / "w" / "pairs-512").exists()


def test_a_resumed_fit_says_what_was_done(pairs, tmp_path):
    from cli.main import main

    """The CLI's re-run of an interrupted fit prints one line on stderr saying what it resumes from
    (with --quiet and --json too: it is not progress, and stdout keeps only the JSON)."""
    store, _, _ = pairs
    out = tmp_path / "a"
    kw = dict(config=FitConfig(workers=WORKERS, block_rows=128, tasks=2, memory_budget=80_000),
              scheduler="synchronous")
    with pytest.raises(_Kill):  # interrupted in the solves: the statistics are done, some bands written
        fit(store, out, progress=_killer(30), **kw)
    part = AdapterStore.open(out)
    bands = [(len(part.progress(f"fit_pipe{p + 1}", g.rows).done()), g.rows) for p, g in enumerate(part.grids)]
    assert 0 < sum(d for d, _ in bands) < sum(n for _, n in bands)
    said = "".join(f", {d} of {n} output bands of pipe {p + 1} written" for p, (d, n) in enumerate(bands) if d)
    res = CliRunner().invoke(main, ["fit", store.url, "-o", str(out), "--workers", str(WORKERS)])
    assert res.exit_code == 0, res.output
    assert [line for line in res.stderr.splitlines() if line.startswith("resuming")] == [
        f"resuming: statistics done{said}"], res.stderr
    with pytest.raises(_Kill):
        fit(store, out, progress=_killer(30), overwrite=True, **kw)
    for quiet in ("--json", "-q"):
        res = CliRunner().invoke(main, ["fit", store.url, "-o", str(out), "--workers", str(WORKERS), quiet])
        assert res.exit_code == 0 and "resuming: statistics done" in res.stderr, res.output
        assert "resuming" not in res.stdout
        if quiet == "--json":
            assert json.loads(res.stdout)["adapter"] == str(out)
        with pytest.raises(_Kill):
            fit(store, out, progress=_killer(30), overwrite=True, **kw)
