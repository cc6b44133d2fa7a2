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


def test_swapped_arguments_are_named(tmp_path):
    """fit-gates and benchmark head given HIDDEN ADAPTER: one line that says to give the adapter first."""
    from cli.main import main

    _, _, h, _ = _planted(tmp_path, rows=100)
    hid = PairsStore.create(str(tmp_path / "hid.zarr"), d_in=16, d_out=0)
    hid.append(h, np.zeros((len(h), 0), np.float32))
    a = tmp_path / "a.zarr"
    for args in (["fit-gates", hid.url, str(a)], ["benchmark", "head", hid.url, str(a)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 1 and "give the adapter first" in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["fit-gates", hid.url, hid.url])  # no adapter at all: no such hint
    assert res.exit_code == 1 and "give the adapter first" not in res.output


def test_band_gate_bars_start_before_their_first_step(tmp_path):
    """The teacher pass's and the epochs' bars start at 0, so their time covers the first epoch too."""
    from contextlib import contextmanager

    adapter, _, _, _ = _planted(tmp_path, rows=300)
    calls: dict = {}

    @contextmanager
    def stages(name):
        yield lambda done, total: calls.setdefault(name, []).append((done, total))

    fit_band_gate(adapter, str(tmp_path / "h.npy"), config=BandGateConfig(epochs=2), stages=stages)
    assert calls["gate epochs"] == [(0, 2), (1, 2), (2, 2)]
    assert calls["teacher pass"][0][0] == 0


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


@pytest.mark.parametrize("source", ["npy", "gguf"])
def test_rerunning_head_over_a_trained_head_names_the_next_step(tmp_path, write_gguf, source):
    """Once the band gate is trained, the head command's no-op says so and points at benchmark head
    and generate, not at fit-gates again; generate's --model is the source when that is a model."""
    from cli.main import main

    _, w, _, _ = _planted(tmp_path, rows=400)
    a, h = tmp_path / "a.zarr", tmp_path / "h.npy"
    src = tmp_path / "w.npy"
    if source == "gguf":
        src = tmp_path / "model.gguf"
        write_gguf(src, {"token_embd.weight": w})
    head = ["head", str(src), "-o", str(a), "--band-rows", "8", "--overwrite"]
    before = CliRunner().invoke(main, head)
    assert before.exit_code == 0 and "next: prismoe fit-gates" in before.stdout, before.output
    assert ("(lm_head is tied to token_embd.weight" in before.stdout) == (source == "gguf")
    assert _cli(a, h, "--epochs", "1").exit_code == 0
    after = CliRunner().invoke(main, head[:-1])
    assert after.exit_code == 0, after.output
    assert f"next (its band gate is trained): prismoe benchmark head {a} HELD_OUT_HIDDEN" in after.stdout
    model = src if source == "gguf" else "MODEL"
    assert f"prismoe generate {a} --model {model} --prompt TEXT --compare" in after.stdout
    assert "fit-gates" not in after.stdout


def test_head_with_hidden_states_names_them_in_its_next_step(tmp_path):
    """`prismoe head --hidden H` orders the vocabulary by H's metric and its next step is
    fit-gates on the same H; a layer-12 store gets the other-layer note first."""
    from cli.main import main

    _, _, h, _ = _planted(tmp_path, rows=300)
    out, hidden = tmp_path / "b.zarr", tmp_path / "h.npy"
    res = CliRunner().invoke(main, ["head", str(tmp_path / "w.npy"), "-o", str(out), "--band-rows", "8",
                                    "--hidden", str(hidden)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == f"next: prismoe fit-gates {out} {hidden}"


@pytest.mark.parametrize("layer", [12, 30])
def test_head_commands_note_hidden_states_of_another_layer(tmp_path, layer):
    """Hidden states collected from layer 12 of 30 have the head's width but are not what it reads:
    fit-gates and benchmark head say so on stderr (and say nothing for the last layer's)."""
    from cli.main import main

    _, _, h, _ = _planted(tmp_path, rows=300)
    store = PairsStore.create(str(tmp_path / "h.zarr"), d_in=h.shape[1], d_out=0, provenance={
        "kind": "collected", "settings": {"layer": layer, "upper_model": {"num_hidden_layers": 30}}})
    store.append(h, np.zeros((len(h), 0), np.float32))
    note = "holds hidden states of layer 12 of 30; a head reads the last layer's"
    for args in (["fit-gates", tmp_path / "a.zarr", tmp_path / "h.zarr", "--epochs", "1", "-q"],
                 ["benchmark", "head", tmp_path / "a.zarr", tmp_path / "h.zarr", "--sparsities", "0.5", "-q"]):
        res = CliRunner().invoke(main, list(map(str, args)))
        assert res.exit_code == 0, res.output
        assert (note in res.stderr) == (layer == 12), res.stderr


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


def test_a_lost_or_damaged_band_gate_is_refused_everywhere_and_named_with_its_repair(tmp_path):
    """A trained band gate cut short or deleted: the finished run's no-op, inspect, infer and `prismoe
    head` refuse it in one line naming `prismoe fit-gates --restart` (they said "already finished" or
    sent the user to `prismoe head`, which did nothing), and --restart repairs it. An untrained head's
    centroid gate is the build's: `prismoe head` writes it again."""
    import shutil

    from cli.main import main

    _planted(tmp_path, rows=600)
    a, h, w = tmp_path / "a.zarr", tmp_path / "h.npy", tmp_path / "w.npy"
    shutil.copytree(a, tmp_path / "untrained.zarr")
    assert _cli(a, h, "--epochs", "1", "-q").exit_code == 0
    trained = AdapterStore.open(str(a)).read_band_gate()
    y = tmp_path / "y.npy"

    def refusals(store, want):
        for args in (["fit-gates", store, h, "-q"], ["fit-gates", store, h, "--json"], ["inspect", store],
                     ["infer", store, "--input", h, "-o", y], ["head", w, "-o", store, "--band-rows", "8"]):
            res = CliRunner().invoke(main, list(map(str, args)))
            assert res.exit_code == 1 and res.stdout == "", (args, res.output)
            assert res.stderr.strip().splitlines()[-1] == want, (args, res.output)
        assert not y.exists()

    cut = tmp_path / "cut.zarr"
    shutil.copytree(a, cut)
    chunk = cut / "gate_weight" / "c" / "0" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(100)
    refusals(cut, f"Error: chunk gate_weight/c/0/0 of {cut} does not hold what was written there (100 bytes, "
             f"{(a / 'gate_weight' / 'c' / '0' / '0').stat().st_size} recorded; truncated, damaged or another "
             "chunk's data): train it again (prismoe fit-gates --restart)")
    assert chunk.stat().st_size == 100  # left as it was
    for what in (["gate_weight"], ["gate_weight", "gate_bias"]):
        gone = tmp_path / f"gone{len(what)}.zarr"
        shutil.copytree(a, gone)
        for name in what:
            shutil.rmtree(gone / name)
        half = "half " if len(what) == 1 else ""
        why = "damaged, or its first write was cut short" if half else "which a finished head adapter always has"
        refusals(gone, f"Error: the band gate of {gone} is {half}missing, {why}: train it again "
                 "(prismoe fit-gates --restart)")
        res = _cli(gone, h, "--restart", "--epochs", "1", "-q")
        assert res.exit_code == 0, res.output
        np.testing.assert_array_equal(AdapterStore.open(str(gone)).read_band_gate()[0], trained[0])
        res = CliRunner().invoke(main, ["infer", str(gone), "--input", str(h), "-o", str(y), "-q"])
        assert res.exit_code == 0, res.output
        y.unlink()
    # never trained: the centroid gate is the build's, and `prismoe head` writes it again
    un = tmp_path / "untrained.zarr"
    centroid = AdapterStore.open(str(un)).read_band_gate()
    shutil.rmtree(un / "gate_bias")
    res = CliRunner().invoke(main, ["infer", str(un), "--input", str(h), "-o", str(y)])
    assert res.exit_code == 1 and res.stderr.strip().splitlines()[-1] == (
        f"Error: the band gate of {un} is half missing, damaged, or its first write was cut short: re-run the "
        "same `prismoe head` command to write it again"), res.output
    res = CliRunner().invoke(main, ["head", str(w), "-o", str(un), "--band-rows", "8"])
    assert res.exit_code == 0 and "its band gate was missing or damaged: the centroid gate is written again" \
        in res.stdout, res.output
    np.testing.assert_array_equal(AdapterStore.open(str(un)).read_band_gate()[1], centroid[1])
    res = CliRunner().invoke(main, ["head", str(w), "-o", str(un), "--band-rows", "8"])
    assert res.exit_code == 0 and "already finished, nothing to do" in res.stdout, res.output


def test_restart_on_a_head_keeps_the_saved_settings_left_out(tmp_path):
    """A head's band gate trained with --sparsity 0.2 --lr 0.005 --epochs 2: --restart trains again
    with those (it went back to ρ 0.1, lr 0.002, 10 epochs, silently) and names them; a given option wins."""
    _planted(tmp_path, rows=600)
    a, h = tmp_path / "a.zarr", tmp_path / "h.npy"
    assert _cli(a, h, "--sparsity", "0.2", "--lr", "0.005", "--epochs", "2", "-q").exit_code == 0
    res = _cli(a, h, "--restart")
    assert res.exit_code == 0, res.output
    assert ("--restart keeps the saved run's --sparsity 0.2, --epochs 2, --lr 0.005 (options given here replace "
            "them)") in res.stderr.splitlines()
    assert "band gate: 600 hidden-state rows (23 held out), 2 epochs" in res.stdout and "ρ = 0.2" in res.stdout
    res = _cli(a, h, "--restart", "--lr", "0.01", "--json")
    info = json.loads(res.stdout)
    assert (info["status"], info["epochs"]) == ("trained", 2), res.output
    assert (info["settings"]["sparsity"], info["settings"]["lr"]) == (0.2, 0.01)
    res = _cli(a, h)  # left out: the saved run's (ρ 0.2, lr 0.01), so a no-op, not "other settings"
    assert res.exit_code == 0 and "already finished, nothing to do" in res.stdout, res.output


def test_a_head_summary_says_it_resumed_and_counts_epochs_in_english(tmp_path):
    """With -q the head summary said nothing of continuing a run (the fitted gates' one says "resumed
    from epoch N"), and it said "1 epochs"."""
    _planted(tmp_path, rows=600)
    a, h = tmp_path / "a.zarr", tmp_path / "h.npy"
    res = _cli(a, h, "--epochs", "1", "-q")
    assert res.exit_code == 0 and res.stdout.startswith("band gate: 600 hidden-state rows (23 held out), 1 epoch, "), \
        res.output
    res = _cli(a, h, "--epochs", "3", "-q")
    assert res.exit_code == 0 and res.stdout.splitlines()[0] == "resumed from epoch 1", res.output
    assert res.stdout.splitlines()[1].startswith("band gate: 600 hidden-state rows (23 held out), 3 epochs, ")
    res = _cli(a, h, "-q")  # a no-op resumes nothing
    assert "resumed" not in res.stdout and "already finished" in res.stdout, res.output
