"""`prismoe head`: a head adapter straight from a matrix in every source format, exact at all bands,
no stored padding, resumable, refusing what it must."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_gguf, write_safetensors

from prismoe_store.errors import CorruptStoreError, DataError, StoreError
from prismoe_store.grid import plan_grid
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.head.vocab_order import OrderConfig
from prismoe_store.runtime import open_runtime
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.weights import WeightsStore


def _head(V=203, d=32, seed=0):
    return np.random.default_rng(seed).standard_normal((V, d)).astype(np.float32)


def _logits(adapter, x, **kw):
    with open_runtime(adapter, sparsity=1.0, **kw) as rt:
        return rt(torch.from_numpy(x))


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "npy", "weights", "pt"])
def test_all_bands_are_bit_identical_to_the_dense_product(tmp_path, fmt):
    w = _head()
    if fmt == "safetensors":
        src = write_safetensors(tmp_path / "m.safetensors", {"lm_head.weight": w, "model.norm.weight": w[0]})
    elif fmt == "gguf":
        w = write_gguf(tmp_path / "m.gguf", {"output.weight": (w, "Q8_0"), "token_embd.weight": w})["output.weight"]
        src = tmp_path / "m.gguf"
    elif fmt == "npy":
        np.save(tmp_path / "lm_head.npy", w)
        src = tmp_path / "lm_head.npy"
    elif fmt == "pt":
        torch.save({"lm_head.weight": torch.from_numpy(w)}, tmp_path / "m.pt")
        src = tmp_path / "m.pt"
    else:
        ws = WeightsStore.create(str(tmp_path / "w.zarr"))
        ws.write_matrix("lm_head.weight", w, plan_grid(32, 203, 8))
        src = tmp_path / "w.zarr"
    report = build_head(str(src), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=16))
    a = AdapterStore.open(str(tmp_path / "h.zarr"))
    assert (report.bands, a.n_bands, report.band_rows) == (13, 13, 16)
    assert a.layout == "partition" and a.combine == "select"
    x = np.random.default_rng(1).standard_normal((7, 32)).astype(np.float32)
    ref = torch.from_numpy(x) @ torch.from_numpy(w).T  # [7, 203] the dense product in token order
    assert torch.equal(_logits(a, x), ref)
    # no padding or copies stored: the tile arrays hold exactly the matrix's values
    assert sum(a.tiles(p).shape[0] * a.tiles(p).shape[1] for p in range(a.n_pipes)) == w.size
    assert report.stored_fp32_bytes == w.nbytes


def test_the_order_is_a_stored_permutation_and_bands_hold_its_rows(tmp_path):
    w = _head(V=128, d=8)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8))
    a = AdapterStore.open(str(tmp_path / "h.zarr"))
    order = a.read_order()
    assert sorted(order.tolist()) == list(range(128)) and not np.array_equal(order, np.arange(128))
    for b in range(a.n_bands):
        assert np.array_equal(a.read_band_tiles(b), w[order[b * 8:(b + 1) * 8]])
    # the centroid gate: mean row and log band size
    weight, bias = a.read_band_gate()
    np.testing.assert_allclose(weight[3], w[order[24:32]].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias, np.log(8.0))


def test_an_adapter_store_is_a_source_too(tmp_path):
    w = _head(V=64, d=8)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h1.zarr"), config=HeadConfig(band_rows=8))
    build_head(str(tmp_path / "h1.zarr"), str(tmp_path / "h2.zarr"), config=HeadConfig(band_rows=4))
    x = np.ones((2, 8), np.float32)
    again = _logits(AdapterStore.open(str(tmp_path / "h2.zarr")), x)
    assert torch.equal(again, torch.from_numpy(x) @ torch.from_numpy(w).T)


def test_int8_bytes_and_values(tmp_path):
    w = _head(V=100, d=16)
    np.save(tmp_path / "w.npy", w)
    r = build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8, int8=True))
    assert r.int8_bytes == 100 * 16 + 4 * 100
    a = AdapterStore.open(str(tmp_path / "h.zarr"))
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    got = _logits(a, x, quant="int8").numpy()
    ref = x @ w.T
    scale = np.abs(w).max(axis=1) / 127  # per-row quantization step
    assert np.all(np.abs(got - ref) <= 0.5 * np.abs(x).sum(axis=1)[:, None] * scale[None, :] + 1e-5)


def test_an_interrupted_build_finishes_on_rerun(tmp_path, monkeypatch):
    import prismoe_store.head.build as hb

    w = _head(V=96, d=8)
    np.save(tmp_path / "w.npy", w)
    calls = {"n": 0}
    real = AdapterStore.write_band_tiles

    def flaky(self, band, rows):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, band, rows)

    monkeypatch.setattr(AdapterStore, "write_band_tiles", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8))
    monkeypatch.setattr(AdapterStore, "write_band_tiles", real)
    a = AdapterStore.open(str(tmp_path / "h.zarr"))
    assert not a.complete
    with pytest.raises(StoreError):  # an unfinished adapter is not served
        open_runtime(a)
    order_before = a.read_order()
    r = hb.build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8))
    assert r.bands_written == 12 - 4
    a = AdapterStore.open(str(tmp_path / "h.zarr"))
    assert np.array_equal(a.read_order(), order_before)
    x = np.ones((1, 8), np.float32)
    assert torch.equal(_logits(a, x), torch.from_numpy(x) @ torch.from_numpy(w).T)


def test_refusals(tmp_path):
    w = _head(V=32, d=4)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=4))
    with pytest.raises(StoreError, match=r"built differently \(band_rows differ.*--overwrite"):
        build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8))
    WeightsStore.create(str(tmp_path / "ws.zarr"))
    with pytest.raises(StoreError, match="not a head adapter"):
        build_head(str(tmp_path / "w.npy"), str(tmp_path / "ws.zarr"))
    bad = w.copy()
    bad[17, 1] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match="row 17"):
        build_head(str(tmp_path / "bad.npy"), str(tmp_path / "b.zarr"))
    with pytest.raises(DataError):
        HeadConfig(bands=4, band_rows=4)


def test_identity_order_and_bands_option(tmp_path):
    w = _head(V=300, d=8)
    np.save(tmp_path / "w.npy", w)
    r = build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"),
                   config=HeadConfig(bands=10, order=OrderConfig(method="identity")))
    assert r.band_rows == 32 and r.bands == 10 and r.pipe_rows == [256, 32, 12]
    assert np.array_equal(AdapterStore.open(str(tmp_path / "h.zarr")).read_order(), np.arange(300))


def test_head_command(tmp_path):
    from cli.main import main

    w = _head(V=150, d=12)
    write_safetensors(tmp_path / "m.safetensors", {"lm_head.weight": w})
    out = str(tmp_path / "h.zarr")
    res = CliRunner().invoke(main, ["head", str(tmp_path / "m.safetensors"), "-o", out, "--band-rows", "8",
                                    "--int8", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["bands"] == 19 and info["stored_fp32_bytes"] == w.nbytes and info["int8_bytes"] == 150 * 12 + 600
    res = CliRunner().invoke(main, ["head", str(tmp_path / "m.safetensors"), "-o", out])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [
        f"Error: {out} already holds a head adapter built differently (band_rows, int8 differ from this command's): "
        "pass --overwrite to replace it, or choose another output"]
    res = CliRunner().invoke(main, ["head", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "x.zarr"),
                                    "--tensor", "nope"])
    assert res.exit_code == 1 and "nope" in res.output


def test_a_fit_and_a_head_never_replace_each_other(tmp_path):
    """`fit -o HEAD` and `head -o FITTED` said "a finished fit with other settings" and "a head
    adapter built differently", and --overwrite then replaced the other kind silently: both are
    refused in one line naming what is there, with --overwrite too, and nothing is touched."""
    from cli.main import main

    w = _head(V=40, d=8)
    np.save(tmp_path / "w.npy", w)
    head, fitted = str(tmp_path / "head.zarr"), str(tmp_path / "fitted.zarr")
    build_head(str(tmp_path / "w.npy"), head, config=HeadConfig(band_rows=8))
    runner = CliRunner()
    assert runner.invoke(main, ["synth", "-o", str(tmp_path / "p.zarr"), "--rows", "300", "--d-in", "8",
                                "--d-out", "6", "-q"]).exit_code == 0
    assert runner.invoke(main, ["fit", str(tmp_path / "p.zarr"), "-o", fitted, "--workers", "4", "-q"]).exit_code == 0
    files = {p: sorted(str(f.relative_to(p)) for f in Path(p).rglob("*")) for p in (head, fitted)}
    for extra in ([], ["--overwrite"]):
        res = runner.invoke(main, ["fit", str(tmp_path / "p.zarr"), "-o", head, "--workers", "4", *extra])
        assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
            f"Error: {head} holds a head adapter, not a fitted adapter: refusing to replace it (--overwrite replaces "
            "only a fitted adapter); choose another output"], (extra, res.output)
        res = runner.invoke(main, ["head", str(tmp_path / "w.npy"), "-o", fitted, "--band-rows", "8", *extra])
        assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
            f"Error: {fitted} holds a fitted adapter, not a head adapter: refusing to replace it (--overwrite "
            "replaces only a head adapter); choose another output"], (extra, res.output)
    for p in (head, fitted):
        assert sorted(str(f.relative_to(p)) for f in Path(p).rglob("*")) == files[p]
    assert AdapterStore.open(head).layout == "partition" and AdapterStore.open(fitted).layout == "ensemble"
    # the same kind is still replaced with --overwrite
    res = runner.invoke(main, ["head", str(tmp_path / "w.npy"), "-o", head, "--band-rows", "4", "--overwrite", "-q"])
    assert res.exit_code == 0 and AdapterStore.open(head).band_rows == 4, res.output


def test_a_head_with_a_bias_is_refused(tmp_path):
    w = _head(V=40, d=8)
    write_safetensors(tmp_path / "m.safetensors", {"lm_head.weight": w, "lm_head.bias": np.ones(40, np.float32)})
    with pytest.raises(DataError, match="bias"):
        build_head(str(tmp_path / "m.safetensors"), str(tmp_path / "h.zarr"))
    assert not (tmp_path / "h.zarr").exists()


def test_inspect_describes_a_head_adapter(tmp_path):
    from prismoe_store.inspection.adapter import inspect_adapter

    np.save(tmp_path / "w.npy", _head(V=48, d=8))
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8))
    r = inspect_adapter(str(tmp_path / "h.zarr"))
    assert r.head["bands"] == 6 and r.head["layout"] == "partition" and r.head["gate"] == "[6 × 8]"
    text = r.text()
    assert "select combine (fill -inf)" in text and "band gate" in text and "gate: none" not in text


def test_rerunning_a_finished_head_is_a_no_op_success(tmp_path):
    """Like collect, synth, extract, fit-gates and quantize: the same command over its finished output
    exits 0, says so, and writes nothing (a gate trained since is kept)."""
    from cli.main import main

    w = _head(V=150, d=12)
    write_safetensors(tmp_path / "m.safetensors", {"lm_head.weight": w})
    out = tmp_path / "h.zarr"
    args = ["head", str(tmp_path / "m.safetensors"), "-o", str(out), "--band-rows", "8", "--int8"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    a = AdapterStore.open(str(out), "r+")
    gate = a.read_band_gate()
    a.write_band_gate(gate[0] + 1, gate[1])  # as if fit-gates had trained it since
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"already finished, nothing to do (--overwrite rebuilds it): {out} holds ")
    assert "bands written" not in again.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
    r = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert r["already_finished"] and r["bands_written"] == 0 and r["bands"] == 19 and r["int8_bytes"] == 150 * 12 + 600


def test_rerunning_head_over_a_damaged_finished_head_writes_the_damaged_bands_again(tmp_path):
    """The no-op above is checked, not assumed: a band chunk torn since (or deleted) is found, written
    again from the matrix, and the adapter reads back exact; the other bands are not rewritten."""
    w = _head(V=96, d=8)
    np.save(tmp_path / "w.npy", w)
    out = tmp_path / "h.zarr"
    config = HeadConfig(band_rows=8, order=OrderConfig(method="identity"))
    build_head(str(tmp_path / "w.npy"), str(out), config=config)
    chunks = sorted(p for p in (out / "pipe1" / "tiles" / "c").rglob("*") if p.is_file())
    chunks[1].write_bytes(chunks[1].read_bytes()[:-3])  # torn
    chunks[2].unlink()  # lost
    with pytest.raises(CorruptStoreError):
        AdapterStore.open(str(out)).read_band_tiles(1)
    r = build_head(str(tmp_path / "w.npy"), str(out), config=config)
    assert not r.already_finished and r.bands_written == r.bands_repaired == 2
    assert "2 found damaged, written again" in r.text()
    a = AdapterStore.open(str(out), require_complete=True)
    for band in range(a.n_bands):
        np.testing.assert_array_equal(a.read_band_tiles(band), w[band * 8:(band + 1) * 8])
    assert build_head(str(tmp_path / "w.npy"), str(out), config=config).already_finished


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_a_head_built_from_a_fitted_adapter_holds_what_the_adapter_computes(tmp_path, mode):
    """The head of a fitted adapter is its matrix at ρ = 1 bit for bit (``dense_matrix``: float64
    sums of α_p s_p W_p, independent tiles scaled by 1/C_live), so `compare` finds max abs diff 0."""
    from cli.main import main
    from prismoe_store.grid import plan_pipes
    from prismoe_store.runtime.dense import dense_matrix

    grids = plan_pipes(24, 40, 8)
    a = AdapterStore.create(str(tmp_path / "a.zarr"), grids=grids, mode=mode, alphas=(0.5, 0.3, 0.2),
                            attrs={"complete": True})
    rng = np.random.default_rng(4)
    for p, g in enumerate(grids):
        for r in range(g.rows):
            a.write_band(p, r, rng.standard_normal((g.tile_out, g.d_in_pad)).astype(np.float32))
    build_head(str(tmp_path / "a.zarr"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=8))
    head = AdapterStore.open(str(tmp_path / "h.zarr"))
    assert np.array_equal(dense_matrix(head), dense_matrix(a))
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "h.zarr"), str(tmp_path / "a.zarr"), "-q", "--atol", "0"])
    assert r.exit_code == 0, r.output
