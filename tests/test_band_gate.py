"""The band gate of head adapters: trained from hidden states alone, it learns where the mass is."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from prismoe_store.errors import DataError
from prismoe_store.head.band_gate import BandGateConfig, band_log_mass, fit_band_gate
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.runtime.slot_pool import SlotPool
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.pairs import PairsStore


def _planted(tmp_path, groups=24, size=8, d=16, rows=3000, seed=0):
    """A head whose tokens come in planted groups of similar rows, and hidden states that each point
    at one group (so the winning token, and most of the mass, lie in that group's band)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(groups, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    w = np.repeat(dirs, size, axis=0) * 3 + 0.3 * rng.normal(size=(groups * size, d))
    perm = rng.permutation(groups * size)
    w = w[perm].astype(np.float32)
    g = rng.integers(0, groups, rows)
    h = (2.0 * dirs[g] + 0.4 * rng.normal(size=(rows, d))).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "h.npy", h)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "a.zarr"), config=HeadConfig(band_rows=size))
    return AdapterStore.open(str(tmp_path / "a.zarr"), "r+"), w, h, perm // size


def test_band_log_mass_matches_a_dense_reference(tmp_path):
    adapter, w, h, _ = _planted(tmp_path, rows=50)
    order = adapter.read_order()
    x = torch.from_numpy(h[:20])
    for slots in (1, 5, adapter.n_bands):
        pool = SlotPool(n_tiles=adapter.n_bands, tile_shape=(8, 16), budget_bytes=slots * 8 * 16 * 4,
                        load=lambda b: (adapter.read_band_tiles(b),))
        lse, top = band_log_mass(x, pool, adapter.n_bands, 8)
        logits = x.double() @ torch.from_numpy(w[order]).double().T  # [20, V] adapter order
        ref = torch.logsumexp(logits.view(20, -1, 8), dim=2)
        torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(top, logits.argmax(dim=1) // 8)


def test_the_trained_gate_recovers_the_planted_bands(tmp_path):
    adapter, w, h, group = _planted(tmp_path)
    # the planted groups came back as bands
    bands = group[adapter.read_order()].reshape(-1, 8)
    assert np.mean([len(set(b)) == 1 for b in bands]) >= 0.9
    # from a random gate (what the centroids would give is not used: restart=False keeps the stored gate)
    rng = np.random.default_rng(5)
    adapter.write_band_gate(0.1 * rng.normal(size=(24, 16)).astype(np.float32), np.zeros(24, np.float32))
    rep = fit_band_gate(adapter, str(tmp_path / "h.npy"), config=BandGateConfig(epochs=12, sparsity=1 / 24, lr=0.05))
    assert rep.before["top1"] < 0.3, rep.before
    assert rep.after["top1"] >= 0.95, rep.after
    assert rep.after["loss"] < rep.before["loss"] and rep.after["mass"] > rep.before["mass"]
    # the centroid start is already good on such clean groups
    rep = fit_band_gate(adapter, str(tmp_path / "h.npy"),
                        config=BandGateConfig(epochs=0, sparsity=1 / 24, restart=True))
    assert rep.before["top1"] >= 0.9
    stored = adapter.read_band_gate()
    assert np.isfinite(stored[0]).all() and adapter.attrs()["gates"]["settings"]["sparsity"] == pytest.approx(1 / 24)


def test_hidden_only_store_and_refusals(tmp_path):
    adapter, w, h, _ = _planted(tmp_path, rows=400)
    store = PairsStore.create(str(tmp_path / "hid.zarr"), d_in=16, d_out=0)
    store.append(h, np.zeros((len(h), 0), np.float32))
    rep = fit_band_gate(adapter, str(tmp_path / "hid.zarr"), config=BandGateConfig(epochs=1))
    assert rep.rows == 400 and rep.held_out > 0
    before = adapter.read_band_gate()
    bad = h.copy()
    bad[123, 4] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match=r"other settings \(the hidden states\): pass --restart"):
        fit_band_gate(adapter, str(tmp_path / "bad.npy"), config=BandGateConfig(epochs=1))
    with pytest.raises(DataError, match="row 123"):
        fit_band_gate(adapter, str(tmp_path / "bad.npy"), config=BandGateConfig(epochs=1, restart=True))
    np.save(tmp_path / "narrow.npy", h[:, :8])
    with pytest.raises(DataError, match="8 wide"):
        fit_band_gate(adapter, str(tmp_path / "narrow.npy"))
    after = adapter.read_band_gate()
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])  # unchanged
    with pytest.raises(DataError, match="hidden states only"):
        _ = store.z


def test_fit_gates_command_on_a_head(tmp_path):
    from cli.main import main

    _planted(tmp_path, rows=600)
    res = CliRunner().invoke(main, ["fit-gates", str(tmp_path / "a.zarr"), str(tmp_path / "h.npy"), "--epochs", "2",
                                    "--sparsity", "0.1", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["epochs"] == 2 and info["settings"]["sparsity"] == 0.1 and 0 <= info["after"]["top1"] <= 1
    res = CliRunner().invoke(main, ["fit-gates", str(tmp_path / "a.zarr"), str(tmp_path / "h.npy"), "--epochs", "1",
                                    "--quiet"])
    assert res.exit_code == 0 and "top-1 band recall" in res.output
    # options left out take the band gate's defaults (the help names them), not the fitted gates'
    res = CliRunner().invoke(main, ["fit-gates", str(tmp_path / "a.zarr"), str(tmp_path / "h.npy"), "--epochs", "1",
                                    "--json"])
    settings, defaults = json.loads(res.stdout)["settings"], BandGateConfig()
    assert (settings["sparsity"], settings["lr"], settings["holdout"]) == (defaults.sparsity, defaults.lr,
                                                                          defaults.holdout) == (0.1, 0.002, 0.05)


def _cli(*args):
    from cli.main import main

    return CliRunner().invoke(main, ["fit-gates", *map(str, args)])


def test_fit_gates_on_a_head_resumes_and_knows_a_finished_run(tmp_path):
    _planted(tmp_path, rows=600)
    a, h = tmp_path / "a.zarr", tmp_path / "h.npy"
    res = _cli(a, h, "--epochs", "2", "--json")
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)
    assert first["status"] == "trained" and first["epochs"] == 2
    # the same command again, and the command without --epochs: a checked no-op (no teacher pass)
    for extra in (["--epochs", "2"], []):
        res = _cli(a, h, *extra)
        assert res.exit_code == 0, res.output
        assert "already finished, nothing to do (--restart trains again)" in res.stdout
        assert "teacher pass" not in res.stderr
        res = _cli(a, h, *extra, "--json")
        info = json.loads(res.stdout)
        assert info["status"] == "already finished" and info["teacher_seconds"] == 0
        assert info["history"] == first["history"] and info["after"] == first["after"]
    # a larger --epochs continues from the stored epoch
    res = _cli(a, h, "--epochs", "3")
    assert res.exit_code == 0, res.output
    assert "continuing from epoch 2 to 3" in res.stderr
    res = _cli(a, h, "--epochs", "4", "--json")
    info = json.loads(res.stdout)
    assert (info["status"], info["resumed_from"], info["epochs"]) == ("resumed", 3, 4)
    assert [e["epoch"] for e in info["history"]] == [1, 2, 3, 4] and info["history"][:2] == first["history"]
    # another setting is refused, naming it and the flag that starts over; --restart does start over
    res = _cli(a, h, "--lr", "0.01")
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "other settings (--lr): pass --restart to start over" in res.output
    res = _cli(a, h, "--lr", "0.01", "--epochs", "9")  # refused before anything is said about continuing
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "continuing" not in res.output, res.output
    res = _cli(a, h, "--lr", "0.01", "--epochs", "1", "--restart", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "trained", res.output


def test_fit_gates_on_a_head_refuses_the_fitted_gates_options(tmp_path):
    _planted(tmp_path, rows=300)
    for option, value in (("--balance-coef", "0.5"), ("--patience", "3"), ("--init", "zero")):
        res = _cli(tmp_path / "a.zarr", tmp_path / "h.npy", option, value, "--epochs", "1")
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert f"{option} does not apply to a head adapter" in res.output
    assert AdapterStore.open(str(tmp_path / "a.zarr")).gates_record() is None  # nothing was trained


def test_an_interrupted_band_gate_run_resumes_on_the_same_trajectory(tmp_path):
    import shutil

    adapter, w, h, _ = _planted(tmp_path, rows=600)
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    whole = fit_band_gate(adapter, str(tmp_path / "h.npy"), config=BandGateConfig(epochs=3, lr=0.05))
    other = AdapterStore.open(str(tmp_path / "b.zarr"), "r+")
    fit_band_gate(other, str(tmp_path / "h.npy"), config=BandGateConfig(epochs=1, lr=0.05))  # stopped after 1
    rest = fit_band_gate(other, str(tmp_path / "h.npy"), config=BandGateConfig(epochs=3, lr=0.05))
    assert rest.status == "resumed" and rest.resumed_from == 1
    assert [e["loss"] for e in rest.history] == pytest.approx([e["loss"] for e in whole.history], rel=1e-5)
    np.testing.assert_allclose(other.read_band_gate()[0], adapter.read_band_gate()[0], rtol=1e-4, atol=1e-6)
