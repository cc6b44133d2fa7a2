"""Gate training on frozen tiles (prismoe_store.gates: tiles, gate, heldout, training), routing statistics
and the quality report (prismoe_store.gates.report).

References: float64 numpy products and statistics recomputed from the stores' bytes, the fit's
own held-out metrics, numpy.linalg.lstsq, and an uninterrupted run for resume.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from prismoe_store.data.synth import SynthSpec, load_truth, synthesize
from prismoe_store.errors import DataError, StoreError
from prismoe_store.fit import FitConfig, fit
from prismoe_store.gates.gate import Gates, gated_forward, init_gates
from prismoe_store.gates.heldout import Split, resolve_split
from prismoe_store.gates.report import quality_report, routing_report
from prismoe_store.gates.routing import active_mask, k_for
from prismoe_store.gates.settings import GateSettings
from prismoe_store.gates.tiles import FrozenTiles
from prismoe_store.gates.training import fit_gates
from prismoe_store.grid import plan_pipes
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore, holdout_mask

D_IN, D_OUT, WORKERS = 32, 32, 16  # pipes 1, 2: 4×4 tiles of 8×8; pipe 3: 8×2 tiles of 4×16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one torch thread is many times faster on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """``synth --kind gated`` pairs (4 regions: each input uses a quarter of every pipe's tiles),
    the fitted adapter, and an adapter holding the ground-truth tiles (where an exact gate exists)."""
    root = tmp_path_factory.mktemp("gated")
    spec = SynthSpec(rows=4096, d_in=D_IN, d_out=D_OUT, kind="gated", noise=0.01, regions=4, workers=WORKERS)
    pairs = synthesize(str(root / "pairs"), spec, rows_per_chunk=1024)
    fitted = fit(pairs, str(root / "fitted"), FitConfig(workers=WORKERS), scheduler="synchronous")
    truth = _tiles_adapter(str(root / "truth"), load_truth(pairs).w, fitted)
    return pairs, fitted, truth


def _tiles_adapter(url, w: np.ndarray, like: AdapterStore, mode: str = "joint") -> AdapterStore:
    """An adapter with the grids and fit record of ``like`` whose every pipe holds the matrix ``w``."""
    a = AdapterStore.create(url, grids=like.grids, mode=mode, attrs={"fit": like.attrs()["fit"]})
    for p, g in enumerate(a.grids):
        for j, _, _ in g.iter_tiles():
            rows, cols = g.valid_region(j)
            tile = np.zeros(g.tile_shape, np.float32)
            tile[: rows.stop - rows.start, : cols.stop - cols.start] = w[rows, cols]
            a.write_tile(p, j, tile)
    a.update_attrs(complete=True)
    return a


def _copy(adapter: AdapterStore, url) -> AdapterStore:
    shutil.copytree(adapter.url, url)
    return AdapterStore.open(url, "r+")


def _numpy_forward(x, tiles: list[np.ndarray], grids, alphas, mode, gates, rho, temperature=1.0):
    """float64 reference of the gated adapter: scores, top-k, weights, Σ_p α_p Σ_S w T x."""
    y = np.zeros((x.shape[0], grids[0].d_out))
    for T, g, alpha, (W, b) in zip(tiles, grids, alphas, gates):
        s = x @ W.T.astype(np.float64) + b
        s[:, ~active_mask(g).numpy()] = -np.inf
        K = k_for(rho, g.active_count)
        xp = np.zeros((x.shape[0], g.d_in_pad))
        xp[:, : g.d_in] = x
        for t in range(x.shape[0]):
            sel = np.argsort(-s[t], kind="stable")[:K]
            top = s[t, sel] / temperature
            if mode == "joint":
                w = K * np.exp(top - top.max()) / np.exp(top - top.max()).sum()
            else:
                w = np.zeros(K)
                for band in set(sel // g.cols):
                    m = sel // g.cols == band
                    e = np.exp(top[m] - top[m].max())
                    w[m] = e / e.sum()
            out = np.zeros(g.d_out_pad)
            for j, wj in zip(sel, w):
                rows, cols = g.tile_region(j)
                out[rows] += wj * T[rows, cols].astype(np.float64) @ xp[t, cols]
            y[t] += alpha * out[: g.d_out]
    return y


# -- the gated forward -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["joint", "independent"])
@pytest.mark.parametrize("rho", [0.1, 0.3, 1.0])
def test_gated_forward_matches_numpy_reference(mode, rho):
    grids = plan_pipes(D_IN, 20, WORKERS)  # d_out 20: padding rows; both product paths (a > b and a < b)
    rng = np.random.default_rng(0)
    tiles = [rng.normal(size=g.padded_shape).astype(np.float32) for g in grids]
    gates = [(rng.normal(size=(g.workers, D_IN)).astype(np.float32), rng.normal(size=g.workers).astype(np.float32))
             for g in grids]
    alphas = [0.5, 0.3, 0.2]
    x = rng.normal(size=(6, D_IN))
    ft = FrozenTiles([torch.from_numpy(t) for t in tiles], grids, alphas, mode)
    y, routings = gated_forward(ft, Gates.from_arrays(gates), torch.from_numpy(x).float(), sparsity=rho,
                                temperature=0.8)
    ref = _numpy_forward(x, tiles, grids, alphas, mode, gates, rho, temperature=0.8)
    np.testing.assert_allclose(y.detach().double().numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert [r.indices.shape[1] for r in routings] == [k_for(rho, g.active_count) for g in grids]


def test_rho1_uniform_gate_joint_is_the_dense_product():
    grids = plan_pipes(D_IN, 20, WORKERS)
    rng = np.random.default_rng(1)
    dense = [np.zeros(g.padded_shape, np.float32) for g in grids]
    for d in dense:
        d[:20, :D_IN] = rng.normal(size=(20, D_IN))
    ft = FrozenTiles([torch.from_numpy(d) for d in dense], grids, [0.2, 0.3, 0.5], "joint")
    x = rng.normal(size=(16, D_IN)).astype(np.float32)
    y, _ = gated_forward(ft, Gates.zeros(grids, D_IN), torch.from_numpy(x), sparsity=1.0)
    ref = sum(a * (x.astype(np.float64) @ d[:20, :D_IN].T.astype(np.float64)) for a, d in zip([0.2, 0.3, 0.5], dense))
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ft.dense(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_gates_of_selected_workers():
    grids = plan_pipes(D_IN, D_OUT, WORKERS)[:1]
    ft = FrozenTiles([torch.randn(*grids[0].padded_shape)], grids, [1.0], "joint")
    gates = Gates([torch.randn(WORKERS, D_IN)], [torch.randn(WORKERS)])
    x = torch.randn(1, D_IN)
    y, (r,) = gated_forward(ft, gates, x, sparsity=0.25)
    y.pow(2).sum().backward()
    grad_b = gates.biases[0].grad
    chosen = set(r.indices[0].tolist())
    assert all(float(grad_b[j]) == 0.0 for j in range(WORKERS) if j not in chosen)
    assert any(float(grad_b[j]) != 0.0 for j in chosen)
    assert all(t.grad is None and not t.requires_grad for t in ft.tiles)  # tiles frozen


def test_exported_gate_gives_the_same_scores_on_raw_inputs():
    grids = plan_pipes(D_IN, D_OUT, WORKERS)
    ft = FrozenTiles([torch.randn(*g.padded_shape) for g in grids], grids, [1 / 3] * 3, "joint")
    x = torch.randn(200, D_IN) * 5 + 3
    z = torch.randn(200, D_OUT)
    gates = init_gates(ft, x, z, kind="gain", scale=1.0)
    for p, (W, b) in enumerate(gates.export()):
        raw = x.double() @ torch.from_numpy(W).double().T + torch.from_numpy(b).double()
        torch.testing.assert_close(raw, gates.scores(p, x).detach().double(), rtol=1e-4, atol=1e-4)


def test_tiles_over_the_memory_budget_are_refused(gated):
    _, fitted, _ = gated
    with pytest.raises(DataError, match="max-tile-mb"):
        FrozenTiles.load(fitted, max_bytes=1000)


# -- training ----------------------------------------------------------------------------------


def test_training_lowers_heldout_error_where_a_good_gate_exists(gated, tmp_path):
    """Ground-truth tiles, ρ = 1/regions: the right gate reproduces z, the zero gate does not."""
    pairs, _, truth = gated
    a = _copy(truth, tmp_path / "a")
    r = fit_gates(a, pairs, GateSettings(sparsity=0.25, epochs=6, init="zero"))
    zero, after = r["before"]["zero"]["rel_err"], r["after"]["rel_err"]
    assert zero > 1.0  # an arbitrary quarter of the tiles is worse than nothing
    assert after < 0.6 * zero, r["history"]
    assert r["best_epoch"] > 0  # the improvement is the training's, not the (zero) init's
    # the gates were written and give that error again when re-read from the store
    q = quality_report(AdapterStore.open(a.url), pairs, sparsities=[0.25])
    row = {x["gate"]: x for x in q["rows"]}
    assert row["trained"]["rel_err"] == pytest.approx(after, rel=1e-5)
    assert row["zero"]["rel_err"] == pytest.approx(zero, rel=1e-5)
    # the gain initialisation alone already picks better tiles than the zero gate
    assert row["init"]["rel_err"] < 0.7 * zero


def test_fit_then_fit_gates_on_gated_pairs_beats_the_untrained_gate(gated, tmp_path):
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    r = fit_gates(a, pairs, GateSettings(sparsity=0.3, epochs=6))
    assert r["after"]["rel_err"] < 0.9 * r["before"]["zero"]["rel_err"]
    assert r["after"]["rel_err"] <= r["before"]["init"]["rel_err"]  # never worse than the init on held-out rows
    info = AdapterStore.open(a.url).attrs()["gates"]
    assert info["complete"] and info["settings"]["sparsity"] == 0.3 and info["split"]["source"] == "fit"
    assert info["metrics"]["after"]["rel_err"] == pytest.approx(r["after"]["rel_err"])


class _Stop(Exception):
    pass


def test_resume_continues_from_the_last_saved_epoch(gated, tmp_path):
    pairs, fitted, _ = gated
    kw = dict(sparsity=0.3, epochs=4, patience=0, lr=2e-2)
    ref = _copy(fitted, tmp_path / "ref")
    full = fit_gates(ref, pairs, GateSettings(**kw))
    assert full["epochs_run"] == 4 and full["resumed_from"] is None

    a = _copy(fitted, tmp_path / "a")
    calls: list = []
    first = fit_gates(a, pairs, GateSettings(**{**kw, "epochs": 2}), progress=lambda d, t: calls.append((d, t)))
    assert first["epochs_run"] == 2
    n_train = Split(0.1, 0).counts(pairs)[0]
    assert calls[0] == (0, 2 * n_train) and calls[-1] == (2 * n_train, 2 * n_train)  # the bar starts at 0

    def crash(done, total):  # killed in the middle of epoch 3
        if done > n_train // 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit_gates(a, pairs, GateSettings(**kw), progress=crash)
    resumed = fit_gates(a, pairs, GateSettings(**kw))
    assert resumed["resumed_from"] == 2 and resumed["epochs_run"] == 4
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3, 4]
    for h1, h2 in zip(full["history"], resumed["history"]):
        assert h1["rel_err"] == pytest.approx(h2["rel_err"], rel=1e-5)
    for p in range(3):
        w1, b1 = AdapterStore.open(ref.url).read_gate(p)
        w2, b2 = AdapterStore.open(a.url).read_gate(p)
        np.testing.assert_allclose(w1, w2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-6)
    # a finished run is not redone; other settings need --restart
    again = fit_gates(a, pairs, GateSettings(**kw))
    assert again["resumed_from"] == 4 and again["epochs_run"] == 4
    with pytest.raises(DataError, match="restart"):
        fit_gates(a, pairs, GateSettings(**{**kw, "sparsity": 0.5}))
    restarted = fit_gates(a, pairs, GateSettings(**{**kw, "sparsity": 0.5, "epochs": 1}), restart=True)
    assert restarted["resumed_from"] is None


def test_split_comes_from_the_fit_and_bad_input_is_refused(gated, tmp_path):
    pairs, fitted, _ = gated
    assert resolve_split(fitted) == Split(0.1, 0, "fit")
    with pytest.warns(UserWarning, match="optimistic"):
        assert resolve_split(fitted, holdout=0.2).holdout == 0.2
    other = PairsStore.create(str(tmp_path / "other"), d_in=D_IN, d_out=D_OUT + 1)
    with pytest.raises(DataError, match="adapter maps"):
        fit_gates(_copy(fitted, tmp_path / "a"), other)
    with pytest.raises(StoreError, match="read-only"):
        fit_gates(AdapterStore.open(fitted.url), pairs)
    with pytest.raises(DataError, match="batch-size"):
        fit_gates(_copy(fitted, tmp_path / "b"), pairs, GateSettings(batch_size=10**6), max_tile_bytes=1 << 20)
    with pytest.raises(DataError):
        GateSettings(sparsity=0.0)


def test_fit_gates_takes_one_validated_config(gated, tmp_path):
    """fit_gates is entered through a GateSettings only; holdout/seed left None take the fit's split and are
    stored resolved (what a resumed run and the pipeline compare)."""
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    with pytest.raises(DataError, match="GateSettings"):
        fit_gates(a, pairs, {"epochs": 1})
    with pytest.raises(TypeError):
        fit_gates(a, pairs, GateSettings(epochs=1), "cpu")  # runtime options are keyword-only
    for bad in (dict(holdout=1.0), dict(holdout=0.0), dict(seed=-1), dict(epochs=True), dict(batch_size=0),
                dict(lr=float("nan")), dict(init="random"), dict(z_loss_coef=-1.0)):
        with pytest.raises(DataError):
            GateSettings(**bad)
    r = fit_gates(a, pairs, GateSettings(sparsity=0.5, epochs=1))
    fit_split = fitted.attrs()["fit"]["settings"]
    stored = AdapterStore.open(a.url).attrs()["gates"]
    assert (stored["settings"]["holdout"], stored["settings"]["seed"]) == (fit_split["holdout"], fit_split["seed"])
    assert stored["split"]["source"] == "fit" and r["split"] == stored["split"]
    assert fit_gates(a, pairs, GateSettings(sparsity=0.5, epochs=1))["resumed_from"] == 1  # the same settings


# -- statistics and the quality report --------------------------------------------------------


def test_routing_statistics_match_a_numpy_recomputation(tmp_path):
    spec = SynthSpec(rows=1500, d_in=33, d_out=17, kind="linear", noise=0.01)  # 33→17: padding-only workers
    pairs = synthesize(str(tmp_path / "p"), spec, rows_per_chunk=512)
    a = fit(pairs, str(tmp_path / "a"), FitConfig(workers=16, holdout=0.2, seed=3), scheduler="synchronous")
    rng = np.random.default_rng(5)
    gates = []
    for p, g in enumerate(a.grids):
        W, b = rng.normal(size=(g.workers, 33)).astype(np.float32), rng.normal(size=g.workers).astype(np.float32)
        a.write_gate(p, W, b)
        gates.append((W, b))
    rho = 0.4
    rep = routing_report(AdapterStore.open(a.url), pairs, sparsity=rho, quality=False)

    x, _ = pairs.read(0, pairs.rows)
    x = x[holdout_mask(3, 0, pairs.rows, 0.2)].astype(np.float64)
    assert rep["pipes"][0]["rows"] == len(x)
    for p, (g, (W, b)) in enumerate(zip(a.grids, gates)):
        act = active_mask(g).numpy()
        n, K = int(act.sum()), k_for(rho, g.active_count)
        assert n < g.workers
        s = x @ W.T.astype(np.float64) + b
        s[:, ~act] = -np.inf
        sel = np.argsort(-s, axis=1)[:, :K]
        f = np.bincount(sel.ravel(), minlength=g.workers) / len(x)
        P = np.exp(s - s.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        H = -(np.where(P > 0, P * np.log(np.where(P > 0, P, 1)), 0)).sum(1)
        u = f[act] / f[act].sum()
        T = a.tiles(p)[...].astype(np.float64)
        xp = np.zeros((len(x), g.d_in_pad))
        xp[:, :33] = x
        E = np.stack([((xp[:, g.input_slice(j)] @ T[g.tile_region(j)].T) ** 2).sum(1) for j in range(g.workers)], 1)
        e_sel = np.take_along_axis(E, sel, 1).sum()
        st = rep["pipes"][p]
        assert st["k"] == K and st["active"] == n
        np.testing.assert_allclose(np.asarray(st["utilization"]).ravel(), f, atol=1e-12)
        assert np.asarray(st["padding"]).ravel().tolist() == (~act).tolist()
        assert st["utilization_cv"] == pytest.approx(f[act].std() / f[act].mean(), rel=1e-9)
        assert st["dead_workers"] == int((f[act] == 0).sum())
        assert st["balance_loss"] == pytest.approx(g.workers * (f * P.mean(0)).sum() / K, rel=1e-5)
        assert st["token_entropy"] == pytest.approx(H.mean(), rel=1e-5)
        assert st["token_entropy_norm"] == pytest.approx(H.mean() / math.log(n), rel=1e-5)
        assert st["utilization_entropy_norm"] == pytest.approx(-(u[u > 0] * np.log(u[u > 0])).sum() / math.log(n),
                                                               rel=1e-9)
        assert st["energy_share"] == pytest.approx(e_sel / E.sum(), rel=1e-4)
        assert sum(st["hist_token_entropy_norm"]) == sum(st["hist_energy_share"]) == len(x)


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_quality_report_baselines_agree_with_the_fit_and_lstsq(tmp_path, mode):
    spec = SynthSpec(rows=2000, d_in=24, d_out=40, kind="gated", noise=0.05, regions=2, workers=8)
    pairs = synthesize(str(tmp_path / "p"), spec, rows_per_chunk=512)
    a = fit(pairs, str(tmp_path / "a"), FitConfig(workers=8, mode=mode, holdout=0.15, seed=2), scheduler="synchronous")
    q = quality_report(a, pairs, sparsities=[0.5, 1.0])
    combined = a.attrs()["metrics"]["combined"]
    dense = q["baselines"]["dense"]
    assert q["heldout_rows"] == a.attrs()["metrics"]["holdout_rows"]
    assert dense["rel_err"] == pytest.approx(combined["rel_err"], rel=1e-4)
    assert dense["r2"] == pytest.approx(combined["r2"], rel=1e-4)
    zero1 = next(r for r in q["rows"] if r["gate"] == "zero" and r["sparsity"] == 1.0)
    assert zero1["rel_err"] == pytest.approx(dense["rel_err"], rel=1e-5)  # ρ = 1 with a uniform gate is dense
    # lstsq: numpy on the training rows (the fit's split), scored on the held-out rows
    x, z = pairs.read(0, pairs.rows)
    hold = holdout_mask(2, 0, pairs.rows, 0.15)
    W = np.linalg.lstsq(x[~hold].astype(np.float64), z[~hold].astype(np.float64), rcond=None)[0]
    res = x[hold] @ W - z[hold]
    assert q["baselines"]["lstsq"]["rel_err"] == pytest.approx(np.linalg.norm(res) / np.linalg.norm(z[hold]), rel=1e-4)
    assert [r["gate"] for r in q["rows"]] == ["zero", "zero", "init", "init"]  # no trained gate stored


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_fit_gates_routing_and_plots(gated, tmp_path):
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "2", "--quiet", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert out["epochs_run"] == 2 and set(out["before"]) == {"zero", "init", "dense"}

    plots = tmp_path / "plots"
    run = CliRunner().invoke(main, ["routing", a.url, pairs.url, "--quiet", "--json", "--plot", str(plots)])
    assert run.exit_code == 0, run.output
    rep = json.loads(run.output)
    assert rep["sparsity"] == 0.3 and len(rep["pipes"]) == 3
    assert {r["sparsity"] for r in rep["quality"]["rows"]} == {0.1, 0.3, 0.5, 1.0}
    assert {r["gate"] for r in rep["quality"]["rows"]} == {"zero", "init", "trained"}
    for name in ("routing_utilization.png", "routing_histograms.png", "quality.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = CliRunner().invoke(main, ["routing", a.url, pairs.url, "--quiet", "--no-quality"])
    assert run.exit_code == 0 and "util CV" in run.output and "held-out quality" not in run.output

    run = CliRunner().invoke(main, ["benchmark", "gates", a.url, pairs.url, "--sparsities", "0.5", "--epochs", "1",
                                    "--quiet"])
    assert run.exit_code == 0, run.output
    assert "trained" in run.output and "lstsq" in run.output


def test_cli_fit_gates_rerun_keeps_the_saved_epochs(gated, tmp_path):
    """Left out, --epochs is the saved run's: a finished run re-run without it is a no-op, and a
    larger --epochs says it continues."""
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "1", "--patience", "0", "--json"])
    assert run.exit_code == 0 and json.loads(run.stdout)["status"] == "trained", run.output
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--patience", "0", "--quiet"])
    assert run.exit_code == 0, run.output
    assert "already finished, nothing to do (--restart trains again)" in run.stdout
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--patience", "0", "--json"])
    out = json.loads(run.stdout)
    assert (out["status"], out["epochs_run"]) == ("already finished", 1)
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "2", "--patience", "0"])
    assert run.exit_code == 0, run.output
    assert "continuing from epoch 1 to 2" in run.stderr and "resumed from epoch 1" in run.stdout
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "3", "--lr", "0.05"])
    assert run.exit_code == 1 and run.output.strip().splitlines() == [
        "Error: saved gate training used other settings (--lr): pass --restart to start over"]


def test_a_damaged_gate_survives_a_failed_fit_gates_and_stays_refused(gated, tmp_path):
    """A gate chunk cut short: fit-gates fails with one line and leaves the gate's files as they were
    (they used to be deleted, after which a re-run reported the old run as finished and the runtime
    ran that pipe ungated); every later reader refuses it, and --restart trains it again."""
    from prismoe_store.errors import CorruptStoreError
    from prismoe_store.runtime.open import open_runtime

    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    fit_gates(a, pairs, GateSettings(sparsity=0.3, epochs=1, patience=0))
    chunk = tmp_path / "a" / "pipe1" / "gate_weight" / "c" / "0" / "0"
    assert chunk.is_file()
    with open(chunk, "r+b") as f:
        f.truncate(100)
    for _ in range(2):  # the re-run too: refused, not "already finished"
        run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "1", "--patience", "0"])
        assert run.exit_code == 1 and len(run.output.strip().splitlines()) == 1, run.output
        assert "pipe1/gate_weight" in run.output or "gate" in run.output
        assert chunk.is_file() and chunk.stat().st_size == 100  # left as it was
    with pytest.raises(StoreError):
        open_runtime(a.url, sparsity=0.3)
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "1", "--patience", "0", "--restart"])
    assert run.exit_code == 0, run.output
    assert AdapterStore.open(a.url).read_gate(0) is not None
    open_runtime(a.url, sparsity=0.3).close()

    # a gate gone from an adapter whose gate training is recorded as finished is damage, not "no gate"
    b = _copy(a, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "pipe2" / "gate_weight")
    shutil.rmtree(tmp_path / "b" / "pipe2" / "gate_bias")
    with pytest.raises(CorruptStoreError, match=r"gate of pipe 2 \(missing\)"):  # named as its folder, pipe2
        AdapterStore.open(b.url).read_gate(1)
    with pytest.raises(CorruptStoreError, match=r"gate of pipe 2 \(missing\)"):
        open_runtime(b.url, sparsity=0.3)
    # half a gate (its bias folder gone): one line, not a traceback, and --restart repairs it
    c = _copy(a, tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "pipe2" / "gate_bias")
    with pytest.raises(CorruptStoreError, match=r"gate of pipe 2 \(half missing\)"):
        AdapterStore.open(c.url).read_gate(1)
    run = CliRunner().invoke(main, ["infer", c.url, "--input", pairs.url, "-o", str(tmp_path / "y.npy")])
    assert run.exit_code == 1 and "Traceback" not in run.output and len(run.output.strip().splitlines()) == 1
    run = CliRunner().invoke(main, ["fit-gates", c.url, pairs.url, "--epochs", "1", "--patience", "0", "--restart"])
    assert run.exit_code == 0, run.output
    assert AdapterStore.open(c.url).read_gate(1) is not None


def test_a_lost_gate_folder_is_refused_by_every_reader_and_restart_repairs_it(gated, tmp_path):
    """A whole pipe's gate gone (both folders) from an adapter whose gates are recorded as trained:
    inspect and the finished run's no-op refuse it in the same line infer gives (pipe 2 for pipe2,
    and --restart), nothing is changed by the refusals, and fit-gates --restart writes it again."""
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    fit_gates(a, pairs, GateSettings(sparsity=0.3, epochs=1, patience=0))
    kept = a.read_gate(0)
    for name in ("gate_weight", "gate_bias"):
        shutil.rmtree(tmp_path / "a" / "pipe2" / name)
    want = (f"Error: the gate of pipe 2 (missing) in {a.url}, whose gate training is recorded as finished: "
            "train the gates again (prismoe fit-gates --restart)")
    y = tmp_path / "y.npy"
    for args in (["infer", a.url, "--input", pairs.url, "-o", str(y)], ["inspect", a.url],
                 ["fit-gates", a.url, pairs.url, "--patience", "0"],
                 ["fit-gates", a.url, pairs.url, "--patience", "0", "--json"]):
        run = CliRunner().invoke(main, args)
        assert run.exit_code == 1 and run.stdout == "" and run.stderr.strip().splitlines()[-1:] == [want], (
            args, run.output)
    assert not y.exists() and "gate_weight" not in AdapterStore.open(a.url).group["pipe2"]
    np.testing.assert_array_equal(AdapterStore.open(a.url).read_gate(0)[0], kept[0])  # the others untouched
    assert AdapterStore.open(a.url).gates_record().finished  # the refusals wrote nothing
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--patience", "0", "--restart", "-q"])
    assert run.exit_code == 0, run.output
    assert AdapterStore.open(a.url).read_gate(1) is not None
    for args in (["infer", a.url, "--input", pairs.url, "-o", str(y), "-q"], ["inspect", a.url]):
        assert CliRunner().invoke(main, args).exit_code == 0
    # a saved, unfinished run (its record says "training") that lost a gate: refused too, not resumed
    b = _copy(fitted, tmp_path / "b")
    fit_gates(b, pairs, GateSettings(sparsity=0.3, epochs=1, patience=0))
    b.update_attrs(gates={**b.attrs()["gates"], "complete": False})
    for name in ("gate_weight", "gate_bias"):
        shutil.rmtree(tmp_path / "b" / "pipe3" / name)
    run = CliRunner().invoke(main, ["fit-gates", b.url, pairs.url, "--epochs", "2", "--patience", "0"])
    assert run.exit_code == 1 and run.stderr.strip().splitlines() == [
        f"Error: the gate of pipe 3 (missing) in {b.url}, whose gate training was saved at epoch 1: "
        "train the gates again (prismoe fit-gates --restart)"], run.output


def test_restart_and_reruns_keep_the_saved_settings_left_out(gated, tmp_path):
    """--restart (the repair the errors name) starts over with the saved run's settings, not the
    defaults, and says which it keeps; an option given replaces its saved value. A plain re-run
    with the options left out resumes the saved run instead of being refused for "other settings"."""
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    first = ["--sparsity", "0.5", "--lr", "0.005", "--epochs", "1", "--patience", "0", "--balance-coef", "0.1"]
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, *first, "-q"])
    assert run.exit_code == 0, run.output
    saved = AdapterStore.open(a.url).gate_settings()
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--restart"])
    assert run.exit_code == 0, run.output
    assert ("--restart keeps the saved run's --sparsity 0.5, --epochs 1, --lr 0.005, --balance-coef 0.1, "
            "--patience 0 (options given here replace them)") in run.stderr.splitlines()
    assert AdapterStore.open(a.url).gate_settings() == saved  # the same run again, not the defaults
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--restart", "--epochs", "2", "--json"])
    out = json.loads(run.stdout)
    assert (out["status"], out["sparsity"], out["epochs_run"]) == ("trained", 0.5, 2), run.output
    assert AdapterStore.open(a.url).gate_settings() == {**saved, "epochs": 2}
    assert "--restart keeps" not in run.stderr  # --json: nothing but the object
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url])  # left out: the saved run's, a no-op
    assert run.exit_code == 0 and "already finished, nothing to do" in run.stdout, run.output
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--lr", "0.05"])  # given: still refused
    assert run.exit_code == 1 and "other settings (--lr)" in run.output, run.output


def test_fit_gates_names_a_hidden_states_store_and_counts_one_epoch(gated, tmp_path):
    """Hidden states (no z) given to a fitted adapter's fit-gates: the store is named for what it
    holds (it said "pairs are 32→0"); and one epoch is "1 epoch"."""
    pairs, fitted, _ = gated
    a = _copy(fitted, tmp_path / "a")
    hid = PairsStore.create(str(tmp_path / "hid.zarr"), d_in=D_IN, d_out=0)
    hid.append(np.ones((50, D_IN), np.float32), np.zeros((50, 0), np.float32))
    run = CliRunner().invoke(main, ["fit-gates", a.url, hid.url, "--epochs", "1"])
    assert run.exit_code == 1 and run.stderr.strip().splitlines() == [
        f"Error: {hid.url} holds hidden states only (no z): the gates of a fitted adapter need pairs with z "
        "(hidden states train a head adapter's band gate)"], run.output
    assert AdapterStore.open(a.url).gates_record() is None
    run = CliRunner().invoke(main, ["fit-gates", a.url, pairs.url, "--epochs", "1", "--patience", "0", "-q"])
    assert run.exit_code == 0 and ", 1 epoch, best epoch" in run.stdout.splitlines()[0], run.output


def test_cli_errors_are_one_line(gated, tmp_path):
    pairs, fitted, _ = gated
    run = CliRunner().invoke(main, ["routing", fitted.url, pairs.url, "--quiet"])
    assert run.exit_code == 1 and "no gates yet" in run.output and "Traceback" not in run.output
    run = CliRunner().invoke(main, ["fit-gates", str(tmp_path / "nothing"), pairs.url, "--quiet"])
    assert run.exit_code == 1 and len(run.output.strip().splitlines()) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_cpu(gated, tmp_path):
    pairs, fitted, _ = gated
    kw = dict(sparsity=0.3, epochs=2, patience=0)
    cpu = fit_gates(_copy(fitted, tmp_path / "cpu"), pairs, GateSettings(**kw))
    gpu = fit_gates(_copy(fitted, tmp_path / "gpu"), pairs, GateSettings(**kw), device="cuda")
    for h1, h2 in zip(cpu["history"], gpu["history"]):
        assert h1["rel_err"] == pytest.approx(h2["rel_err"], rel=1e-2)


def test_the_gain_init_keeps_weights_near_1_on_inputs_with_outlier_dimensions():
    """A residual stream has dimensions with rare huge values: the init's scores stay within
    MAX_INIT_SCORES·scale of their mean on the sample, so at ρ = 1 the init gate is the dense product."""
    from prismoe_store.gates.gate import MAX_INIT_SCORES

    torch.manual_seed(0)
    grids = plan_pipes(D_IN, D_OUT, WORKERS)
    dense = [torch.randn(*g.padded_shape) / D_IN ** 0.5 for g in grids]
    ft = FrozenTiles(dense, grids, [1 / 3] * 3, "joint")
    x = torch.randn(400, D_IN)
    x[::50, 3] = 2.5e4  # 8 rows with an outlier dimension
    z = x @ dense[0][:D_OUT, :D_IN].T
    gates = init_gates(ft, x, z, kind="gain", scale=0.01)
    for p, g in enumerate(grids):
        s = gates.scores(p, x).detach()[:, active_mask(g, torch.device("cpu"))]
        assert float((s - s.mean()).abs().max()) <= MAX_INIT_SCORES * 0.01 * 1.001
    y, _ = gated_forward(ft, gates, x, sparsity=1.0)
    ref = sum(a * (ft.pad(x) @ t.T)[:, :D_OUT] for a, t in zip([1 / 3] * 3, dense, strict=True))
    assert float((y.detach() - ref).norm() / ref.norm()) < 0.2  # weights within about e^±0.1 of 1
