"""The runtime against float64 references: dense products at ρ = 1 for every cache budget and
both pipe schedules, a numpy re-implementation of the routed sum at ρ < 1, INT8, budgets, padding,
and the `prismoe infer` / `prismoe quantize` commands."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tile_sources import Recording

from prismoe_store import open_runtime
from prismoe_store.errors import CacheError, DataError, IncompleteStoreError
from prismoe_store.gates.routing import route
from prismoe_store.grid import plan_grid
from prismoe_store.runtime import grouped
from prismoe_store.runtime.quant import quantize_adapter
from prismoe_store.stores.adapter import AdapterStore
from prismoe_store.stores.formats import StoreOptions
from prismoe_store.stores.pairs import PairsStore

D_IN, D_OUT = 40, 72  # odd widths: every grid has padding, some tiles wholly padding


def make_adapter(path, *, d_in=D_IN, d_out=D_OUT, workers=16, mode="joint", gates=False, seed=0,
                 alphas=(0.5, 0.3, 0.2), compressor="none"):
    """Three pipes of random tiles (random values in the padding too, which must never matter)."""
    grids = [plan_grid(d_in, d_out, workers), plan_grid(d_in, d_out, workers // 2),
             plan_grid(d_in, d_out, workers, layout="wide")]
    a = AdapterStore.create(str(path), grids=grids, mode=mode, alphas=alphas, attrs={"complete": True},
                            options=StoreOptions(compressor=compressor))
    rng = np.random.default_rng(seed)
    for p, g in enumerate(grids):
        for r in range(g.rows):
            a.write_band(p, r, rng.standard_normal((g.tile_out, g.d_in_pad)).astype(np.float32))
        if gates:
            a.write_gate(p, rng.standard_normal((g.workers, d_in)).astype(np.float32), rng.standard_normal(g.workers))
    return a


def dense_reference(a, x):
    """float64 ``Σ_p α_p x W_pᵀ`` and ``Σ_p α_p |x| |W_p|ᵀ`` (the scale of the rounding error)."""
    x = np.asarray(x, np.float64).reshape(-1, a.d_in)
    y, mag = 0.0, 0.0
    for p, alpha in enumerate(a.alphas):
        w = a.dense(p).astype(np.float64)
        y = y + alpha * x @ w.T
        mag = mag + alpha * np.abs(x) @ np.abs(w).T
    return y, mag


def routed_reference(a, x, sparsity):
    """float64 numpy sum over routing.route's selections, tile by tile."""
    x = np.asarray(x, np.float64)
    y = np.zeros((x.shape[0], a.d_out))
    for p, (alpha, g) in enumerate(zip(a.alphas, a.grids, strict=True)):
        gw, gb = a.read_gate(p) or (np.zeros((g.workers, a.d_in), np.float32), np.zeros(g.workers, np.float32))
        r = route(torch.from_numpy(x).float(), torch.from_numpy(gw), torch.from_numpy(gb), grid=g,
                  sparsity=sparsity, mode=a.mode)
        xp = np.zeros((x.shape[0], g.d_in_pad))
        xp[:, : a.d_in] = x
        yp = np.zeros((x.shape[0], g.d_out_pad))
        for t in range(x.shape[0]):
            for j, w in zip(r.indices[t].tolist(), r.weights[t].double().tolist(), strict=True):
                rows, cols = g.tile_region(j)
                yp[t, rows] += w * (a.read_tile(p, j).astype(np.float64) @ xp[t, cols])
        y += alpha * yp[:, : a.d_out]
    return y


def assert_float32_close(y, ref, mag):
    """Within float32 rounding: error per element at most a few eps times Σ|w||x|."""
    y = y.detach().cpu().numpy().reshape(ref.shape).astype(np.float64)
    assert np.all(np.abs(y - ref) <= 8 * np.finfo(np.float32).eps * (mag + 1e-30))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("rt") / "a.zarr", compressor="zstd")


def _budgets(a):
    """Named budgets from one tile to everything (float32 entries)."""
    tile = max(4 * g.tile_out * g.tile_in for g in a.grids)
    pipe = max(4 * g.tile_out * g.tile_in * g.active_count for g in a.grids)
    token = sum(4 * g.tile_out * g.tile_in * g.active_count for g in a.grids)  # ρ = 1: every live tile
    return {"one tile": tile, "one pipe": pipe, "one token": token, "everything": None}


@pytest.mark.parametrize("schedule", ["parallel", "serial"])
@pytest.mark.parametrize("budget", ["one tile", "one pipe", "one token", "everything"])
def test_rho1_equals_the_dense_product_for_every_budget(adapter, schedule, budget):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, D_IN)).astype(np.float32))
    ref, mag = dense_reference(adapter, x.numpy())
    with open_runtime(adapter, cache_bytes=_budgets(adapter)[budget], schedule=schedule, sparsity=1.0) as rt:
        for _ in range(2):  # cold then warm (or streaming) cache
            y = rt(x)
            assert y.shape == (2, 3, D_OUT) and y.dtype == torch.float32
            assert_float32_close(y, ref, mag)
        s = rt.stats()["cache"]
        assert s["peak_bytes"] <= s["budget_bytes"]
        live = sum(g.active_count for g in adapter.grids)
        assert s["hits"] + s["misses"] == 2 * live
        if schedule == "parallel" and budget in ("one token", "everything"):
            assert s["misses"] == live and s["evictions"] == 0  # the second call is all hits


def test_prefetch_changes_nothing_but_timing(adapter):
    x = np.random.default_rng(13).standard_normal((3, D_IN)).astype(np.float32)
    out = {}
    for prefetch in (False, True):
        with open_runtime(adapter, cache_bytes=_budgets(adapter)["one pipe"], prefetch=prefetch) as rt:
            out[prefetch] = ([rt(x) for _ in range(2)], rt.stats()["cache"])
    assert all(torch.equal(a, b) for a, b in zip(out[False][0], out[True][0], strict=True))
    assert out[False][1] == out[True][1]


def test_batch_shapes_and_numpy_input(adapter):
    x = np.random.default_rng(2).standard_normal((5, D_IN)).astype(np.float32)
    rt = open_runtime(adapter)
    y2 = rt(x)
    assert y2.shape == (5, D_OUT)
    assert rt(x[0]).shape == (D_OUT,)
    torch.testing.assert_close(rt(torch.from_numpy(x)[None]), y2[None])
    with pytest.raises(DataError):
        rt(np.ones((2, D_IN + 1), np.float32))
    with pytest.raises(DataError):
        rt(np.full((1, D_IN), np.nan, np.float32))


@pytest.mark.parametrize("fit_mode", ["joint", "independent"])
@pytest.mark.parametrize("schedule", ["parallel", "serial"])
def test_sparse_routing_matches_a_numpy_reference(tmp_path, fit_mode, schedule):
    a = make_adapter(tmp_path / "g.zarr", mode=fit_mode, gates=True, seed=3)
    x = np.random.default_rng(4).standard_normal((6, D_IN)).astype(np.float32)
    ref = routed_reference(a, x, 0.3)
    _, mag = dense_reference(a, x)
    with open_runtime(a, sparsity=0.3, schedule=schedule, cache_bytes=_budgets(a)["one pipe"]) as rt:
        assert_float32_close(rt(x), ref, 4 * mag)
        for t in range(2):  # one token a call (decoding): every tile serves one token, the fused path
            assert_float32_close(rt(x[t]), ref[t], 4 * mag[t])


def test_sparsity_defaults(tmp_path, adapter):
    assert open_runtime(adapter).sparsity == 1.0  # no gates: every tile
    g = make_adapter(tmp_path / "g.zarr", gates=True)
    assert open_runtime(g).sparsity == 0.3
    g.update_attrs(gates={"complete": True, "settings": {"sparsity": 0.5, "temperature": 2.0}})
    assert open_runtime(g).sparsity == 0.5 and open_runtime(g).temperature == 2.0
    assert open_runtime(g, sparsity=0.1).sparsity == 0.1


@pytest.mark.parametrize("sparsity", [1.0, 0.3])
def test_padding_workers_are_never_selected_nor_loaded(tmp_path, sparsity):
    a = make_adapter(tmp_path / "g.zarr", gates=True)
    assert any(g.is_padding(j) for g in a.grids for j in range(g.workers))
    src = Recording(a)
    rt = open_runtime(src, sparsity=sparsity, cache_bytes=_budgets(a)["one tile"])
    rt(np.random.default_rng(5).standard_normal((32, D_IN)).astype(np.float32))
    assert src.reads
    assert not [(p, j) for p, j in src.reads if a.grids[p].is_padding(j)]


def test_serial_holds_one_pipe_parallel_holds_all(adapter):
    x = np.random.default_rng(6).standard_normal((4, D_IN)).astype(np.float32)
    peaks = {}
    for schedule in ("parallel", "serial"):
        with open_runtime(adapter, schedule=schedule) as rt:
            rt(x)
            rt(x)
            peaks[schedule] = rt.stats()["cache"]["peak_bytes"]
    b = _budgets(adapter)
    assert peaks["parallel"] == b["one token"]
    assert peaks["serial"] == b["one pipe"] < peaks["parallel"]


def test_zigzag_reuses_the_last_pipe(adapter):
    """With room for one pipe only, the pipe that ran last is reused first on the next call
    (a fixed pipe order would evict every tile just before it is needed: no hits at all)."""
    x = np.random.default_rng(12).standard_normal((3, D_IN)).astype(np.float32)
    with open_runtime(adapter, cache_bytes=_budgets(adapter)["one pipe"]) as rt:
        ys = [rt(x) for _ in range(3)]
        assert rt.stats()["cache"]["hits"] >= 2 * min(g.active_count for g in adapter.grids)
    ref, mag = dense_reference(adapter, x)
    for y in ys:  # tiles of a band are summed resident-first, so bits may differ, never beyond rounding
        assert_float32_close(y, ref, mag)


def test_budget_never_exceeded_under_random_traffic(tmp_path):
    a = make_adapter(tmp_path / "g.zarr", gates=True)
    rng = np.random.default_rng(7)
    tile = _budgets(a)["one tile"]
    for budget in (tile, 3 * tile, 10 * tile):
        with open_runtime(a, sparsity=0.3, cache_bytes=budget) as rt:
            for _ in range(3):
                rt(rng.standard_normal((int(rng.integers(1, 9)), D_IN)).astype(np.float32))
                assert rt.stats()["cache"]["used_bytes"] <= budget
            s = rt.stats()["cache"]
            assert s["peak_bytes"] <= budget and s["evictions"] > 0


@pytest.mark.parametrize("chunk", [1, 4096, None])
@pytest.mark.parametrize("budget", ["one tile", "one pipe", "everything"])
def test_jagged_product_matches_the_padded_buckets_and_the_reference(tmp_path, monkeypatch, chunk, budget):
    """The CPU's jagged ``grouped_mm`` straight over the slot arena (in runs of ``CHUNK_BYTES``; 1: a
    run per slot) gives what the padded ``bmm`` buckets (the CUDA path) give, float32 and INT8."""
    if chunk is not None:
        monkeypatch.setattr(grouped, "CHUNK_BYTES", chunk)
    a = make_adapter(tmp_path / "j.zarr", gates=True, seed=9)
    quantize_adapter(a)
    x = np.random.default_rng(10).standard_normal((24, D_IN)).astype(np.float32)
    ref = routed_reference(a, x, 0.4)
    _, mag = dense_reference(a, x)
    for quant in (None, "int8"):
        ys = []
        for jagged in (True, False):
            with open_runtime(a, sparsity=0.4, quant=quant, cache_bytes=_budgets(a)[budget]) as rt:
                rt.jagged = jagged
                ys.append(rt(x))
                assert rt.stats()["cache"]["peak_bytes"] <= rt.stats()["cache"]["budget_bytes"]
        if quant is None:
            assert_float32_close(ys[0], ref, 4 * mag)
        assert_float32_close(ys[0], ys[1].double().numpy(), 4 * mag)


def test_int8_is_close_to_fp32(tmp_path):
    """Measured here: ‖y_int8 − y_fp32‖ / ‖y_fp32‖ = 0.46% at ρ = 1 and at ρ = 0.3 (Gaussian tiles
    and inputs; per-tile Frobenius error up to 0.59%); asserted below 1.5%."""
    a = make_adapter(tmp_path / "q.zarr", gates=True)
    with pytest.raises(IncompleteStoreError, match="quantize"):
        open_runtime(a, quant="int8")
    quantize_adapter(a)
    x = np.random.default_rng(8).standard_normal((16, D_IN)).astype(np.float32)
    for sparsity in (1.0, 0.3):
        y32 = open_runtime(a, sparsity=sparsity)(x)
        rt8 = open_runtime(a, sparsity=sparsity, quant="int8")
        y8 = rt8(x)
        rel = float(torch.linalg.norm(y8 - y32) / torch.linalg.norm(y32))
        assert 0 < rel < 0.015, rel
        g = a.grids[0]
        assert rt8.entry_bytes(0) == g.tile_out * g.tile_in + 4 * g.tile_out


def test_errors(tmp_path, adapter):
    tile = _budgets(adapter)["one tile"]
    with pytest.raises(CacheError, match="smaller than one tile"):
        open_runtime(adapter, cache_bytes=tile - 1)
    with pytest.raises(DataError):
        open_runtime(adapter, schedule="sideways")
    with pytest.raises(DataError):
        open_runtime(adapter, sparsity=0.0)
    unfinished = make_adapter(tmp_path / "u.zarr")
    unfinished.update_attrs(complete=False)
    with pytest.raises(IncompleteStoreError):
        open_runtime(unfinished)
    with pytest.raises(IncompleteStoreError):
        open_runtime(str(tmp_path / "u.zarr"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("schedule", ["parallel", "serial"])
def test_cuda_matches_dense_and_stays_in_budget(tmp_path, schedule, quant):
    a = make_adapter(tmp_path / "big.zarr", d_in=1024, d_out=4096, workers=16)  # 1 MiB float32 tiles
    if quant:
        quantize_adapter(a)
    x = np.random.default_rng(9).standard_normal((8, 1024)).astype(np.float32)
    ref, mag = dense_reference(a, x)
    xc = torch.from_numpy(x).cuda()
    torch.cuda.synchronize()
    with open_runtime(a, device="cuda", schedule=schedule, quant=quant, sparsity=1.0) as probe:
        budget = max(g.active_count for g in a.grids) * max(probe.entry_bytes(p) for p in range(3))  # one pipe
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with open_runtime(a, device="cuda", cache_bytes=budget, schedule=schedule, quant=quant, sparsity=1.0) as rt:
        for _ in range(3):
            y = rt(xc)
        torch.cuda.synchronize()
        assert y.is_cuda
        if quant is None:
            assert_float32_close(y, ref, mag)
        else:
            assert float(np.linalg.norm(y.cpu().numpy() - ref) / np.linalg.norm(ref)) < 0.015
        assert rt.stats()["cache"]["peak_bytes"] <= budget
        gates = sum(w.numel() * 4 + b.numel() * 4 for w, b in rt.gates)
        tile = max(4 * g.tile_out * g.tile_in for g in a.grids)  # one dequantized tile at use
        work = 16 * 8 * 4096 * 4  # 16 copies of [8 tokens, d_out] float32: x, bands, pipe outputs, sums
        assert torch.cuda.max_memory_allocated() - base <= budget + gates + tile + work


# -- the commands ----------------------------------------------------------------------------


def _invoke(args):
    from cli.main import main

    return CliRunner().invoke(main, args)


def test_infer_command_npy_and_pairs(tmp_path, adapter):
    x = np.random.default_rng(10).standard_normal((9, D_IN)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "y.npy"
    res = _invoke(["infer", adapter.url, "--input", str(tmp_path / "x.npy"), "-o", str(out), "--json",
                   "--batch-size", "4", "--cache-mb", "0.01", "--mode", "serial", "-q"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    for k in ("hits", "misses", "evictions", "bytes_loaded", "peak_bytes", "budget_bytes"):
        assert isinstance(info["cache"][k], int)
    assert info["seconds"] > 0 and info["rows"] == 9
    assert info["cache"]["peak_bytes"] <= info["cache"]["budget_bytes"] == int(0.01 * 2**20)
    y = np.load(out)
    ref, mag = dense_reference(adapter, x)
    assert y.dtype == np.float32 and y.shape == (9, D_OUT)
    assert_float32_close(torch.from_numpy(y), ref, mag)

    pairs = PairsStore.create(str(tmp_path / "p.zarr"), d_in=D_IN, d_out=D_OUT, rows_per_chunk=4)
    pairs.append(x, np.zeros((9, D_OUT), np.float32))
    res = _invoke(["infer", adapter.url, "--input", str(tmp_path / "p.zarr"), "-o", str(tmp_path / "y2.npy"), "-q"])
    assert res.exit_code == 0, res.output
    assert "hit rate" in res.output
    np.testing.assert_allclose(np.load(tmp_path / "y2.npy"), y, rtol=1e-5, atol=1e-5)  # other batch size


def test_infer_progress_starts_before_the_first_batch(tmp_path, adapter):
    """The bar starts before the first batch (which loads the tiles), so its time and the printed one
    cover the same calls; the summary prints ρ as the other commands do (1, not 1.0)."""
    from prismoe_store.runtime.infer import infer_line, infer_rows

    x = np.random.default_rng(12).standard_normal((10, D_IN)).astype(np.float32)
    calls = []
    with open_runtime(adapter) as rt:
        stats = infer_rows(rt, lambda s, e: x[s:e], 10, tmp_path / "y.npy", batch_size=4,
                           progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 10), (4, 10), (8, 10), (10, 10)]
    assert "ρ = 1, cpu)" in infer_line({**stats, "sparsity": 1.0})


def test_infer_and_quantize_commands_int8(tmp_path):
    a = make_adapter(tmp_path / "a.zarr")
    x = np.random.default_rng(11).standard_normal((3, D_IN)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = _invoke(["infer", a.url, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "--int8"])
    assert res.exit_code == 1 and "prismoe quantize" in res.output and "Traceback" not in res.output
    res = _invoke(["quantize", a.url, "-q"])
    assert res.exit_code == 0, res.output
    res = _invoke(["infer", a.url, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"), "--int8",
                   "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quant"] == "int8"
    y32 = open_runtime(a)(x).numpy()
    y8 = np.load(tmp_path / "y.npy")
    assert np.linalg.norm(y8 - y32) / np.linalg.norm(y32) < 0.015


def test_infer_command_bad_input_is_one_line(tmp_path, adapter):
    np.save(tmp_path / "x.npy", np.ones((2, D_IN + 1), np.float32))
    res = _invoke(["infer", adapter.url, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")])
    assert res.exit_code == 1 and "Traceback" not in res.output and "d_in" in res.output


def test_infer_into_a_missing_folder_says_so_before_any_work(tmp_path, adapter):
    np.save(tmp_path / "x.npy", np.ones((2, D_IN), np.float32))
    out = tmp_path / "missing" / "y.npy"
    res = _invoke(["infer", adapter.url, "--input", str(tmp_path / "x.npy"), "-o", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert f"the folder {out.parent} does not exist" in res.output and ".part" not in res.output
    assert not (tmp_path / "missing").exists()
