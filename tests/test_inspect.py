"""Store inspection, matrix comparison and plots, against NumPy references and real files."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from interrupts import Interrupted, at_first_work

from cli.main import main
from prismoe_store.errors import CorruptStoreError, DataError, StoreError, StoreFormatError, TensorNotFoundError
from prismoe_store.grid import GridSpec, plan_grid
from prismoe_store.inspection.common import INSPECTORS, human_bytes, inspect_store, store_format, tile_stats
from prismoe_store.inspection.compare import compare_matrices, open_matrix, open_tensor
from prismoe_store.inspection.pairs import column_stats
from prismoe_store.plots import tile_heatmap, visualize_tensor
from prismoe_store.stores.formats import StoreOptions, create_checked
from prismoe_store.stores.weights import WeightsStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mem_url() -> str:
    return f"memory://test-inspect-{uuid.uuid4().hex}"


def _matrix(seed: int, d_out: int, d_in: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = (rng.standard_normal((d_out, d_in)) * rng.uniform(0.1, 3.0, size=d_in)).astype(np.float32)
    m[rng.random(m.shape) < 0.15] = 0
    return m


def _reference_stats(m: np.ndarray, grid: GridSpec) -> dict[str, np.ndarray]:
    """Per-tile statistics computed the plain way: cut each tile out of the float64 matrix."""
    ref = {k: np.full(grid.workers, np.nan) for k in ("norm", "mean", "std", "absmax", "zero_share")}
    ref["count"] = np.zeros(grid.workers, np.int64)
    m = m.astype(np.float64)
    for j in range(grid.workers):
        rows, cols = grid.valid_region(j)
        t = m[rows, cols]
        ref["count"][j] = t.size
        if t.size == 0:
            ref["norm"][j] = 0.0
            continue
        ref["norm"][j] = np.linalg.norm(t)
        ref["mean"][j], ref["std"][j] = t.mean(), t.std()
        ref["absmax"][j] = np.abs(t).max()
        ref["zero_share"][j] = np.mean(t == 0)
    return ref


def _png_ok(path) -> None:
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas


# -- tile statistics ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(d_in=st.integers(1, 48), d_out=st.integers(1, 48), workers=st.integers(0, 5).map(lambda k: 1 << k),
       layout=st.sampled_from(["balanced", "wide"]), seed=st.integers(0, 2**31),
       max_bytes=st.sampled_from([1, 300, 10**9]))
def test_tile_stats_match_numpy(d_in, d_out, workers, layout, seed, max_bytes):
    m = _matrix(seed, d_out, d_in)
    grid = plan_grid(d_in, d_out, workers, layout=layout)
    calls = []
    s = tile_stats(m, grid, max_bytes=max_bytes, progress=lambda d, t: calls.append((d, t)))
    ref = _reference_stats(m, grid)
    np.testing.assert_array_equal(s.count, ref["count"])
    for k in ("norm", "mean", "std", "absmax", "zero_share"):
        np.testing.assert_allclose(getattr(s, k), ref[k], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=k)
    assert s.padding.tolist() == [grid.is_padding(j) for j in range(grid.workers)]
    assert calls[-1] == (grid.active_count, grid.active_count)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)

    summ = s.summary()
    m64 = m.astype(np.float64)
    assert summ["frobenius"] == pytest.approx(np.linalg.norm(m64), rel=1e-12)
    assert summ["mean"] == pytest.approx(m64.mean(), rel=1e-9, abs=1e-12)
    assert summ["std"] == pytest.approx(m64.std(), rel=1e-9, abs=1e-12)
    assert summ["absmax"] == np.abs(m64).max()
    assert summ["zero_share"] == pytest.approx(np.mean(m == 0), rel=1e-12)
    assert summ["padding_workers"] == [j for j in range(grid.workers) if grid.is_padding(j)]
    live = ref["norm"][ref["count"] > 0]
    assert (summ["tile_norm_min"], summ["tile_norm_max"]) == (live.min(), live.max())
    assert summ["tile_norm_median"] == pytest.approx(np.median(live))
    json.dumps(s.to_dict(), allow_nan=False)  # JSON-clean: NaN of padding tiles became null


def test_tile_stats_counts_nonfinite_and_checks_shape():
    m = np.ones((4, 4), np.float32)
    m[0, 0], m[3, 3] = np.nan, np.inf
    s = tile_stats(m, plan_grid(4, 4, 4))
    assert s.nonfinite.tolist() == [1, 0, 0, 1] and s.summary()["nonfinite"] == 2
    with pytest.raises(DataError):
        tile_stats(m, plan_grid(5, 4, 4))


# -- inspecting stores -------------------------------------------------------------------------


@pytest.mark.parametrize("shard", [False, True])
def test_inspect_weights_store(tmp_path, shard):
    a, b = _matrix(0, 70, 24), _matrix(1, 9, 33)
    ga, gb = plan_grid(24, 70, 8), plan_grid(33, 9, 4, layout="wide")
    url = tmp_path / "w.zarr"
    store = WeightsStore.create(url, options=StoreOptions(compressor="zstd", shard=shard))
    store.write_matrix("lm_head", a, ga, source={"source": "x.safetensors", "source_dtype": "BF16"})
    store.write_matrix("embedding", b, gb)
    rep = inspect_store(url, max_bytes=1)
    assert [t.name for t in rep.tensors] == ["embedding", "lm_head"]
    t = {t.name: t for t in rep.tensors}["lm_head"]
    assert t.shape == (70, 24) and t.dtype == "float32" and t.grid == ga and t.complete
    assert t.bytes_memory == a.nbytes and 0 < t.bytes_disk
    assert t.source == {"source": "x.safetensors", "source_dtype": "BF16"}
    assert t.codecs[-1] == "crc32c" and t.codecs[0].startswith("zstd")
    assert t.unit == ("band" if shard else "tile") and t.units_done == t.units_total
    ref = _reference_stats(a, ga)
    np.testing.assert_allclose(t.stats.norm, ref["norm"], rtol=1e-12)

    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["format"] == "weights" and d["version"] == 1
    assert {x["name"] for x in d["tensors"]} == {"lm_head", "embedding"}
    assert "lm_head" in rep.text() and "padding-only workers" in rep.text()

    only = inspect_store(url, tensor="embedding", stats=False)
    assert [t.name for t in only.tensors] == ["embedding"] and only.tensors[0].stats is None
    with pytest.raises(TensorNotFoundError, match="lm_head"):
        inspect_store(url, tensor="nope")


def test_inspect_reports_incomplete_tensor():
    url = _mem_url()
    grid = plan_grid(8, 8, 4)
    w = WeightsStore.create(url).begin("t", grid)
    w.write_tile(2, np.ones(grid.tile_shape, np.float32))
    t = inspect_store(url).tensors[0]
    assert not t.complete and t.stats is None and (t.units_done, t.units_total) == (1, 4)
    assert "INCOMPLETE: 1/4 tiles" in inspect_store(url).text()


def test_inspect_dispatches_on_format(tmp_path):
    assert {"weights", "pairs", "adapter"} <= set(INSPECTORS)
    create_checked(tmp_path / "m", "mystery", 1)
    with pytest.raises(StoreFormatError, match="mystery"):
        inspect_store(tmp_path / "m")
    zarr.open_group(str(tmp_path / "plain"), mode="w", zarr_format=3)
    with pytest.raises(StoreFormatError, match="not a prismoe store"):
        inspect_store(tmp_path / "plain")
    create_checked(tmp_path / "v9", "weights", 9)
    with pytest.raises(StoreFormatError, match="version"):
        inspect_store(tmp_path / "v9")
    with pytest.raises(StoreError):
        inspect_store(tmp_path / "missing")


# -- comparing ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(d_out=st.integers(1, 40), d_in=st.integers(1, 40), seed=st.integers(0, 2**31),
       scale=st.sampled_from([0.0, 1e-6, 0.1, 10.0]), max_bytes=st.sampled_from([8, 200, 10**9]))
def test_compare_matches_numpy(d_out, d_in, seed, scale, max_bytes):
    a = _matrix(seed, d_out, d_in).astype(np.float64)
    b = a + scale * np.random.default_rng(seed + 1).standard_normal(a.shape)
    c = compare_matrices(a, b, max_bytes=max_bytes)
    diff = np.abs(a - b)
    assert c.max_abs_diff == diff.max()
    assert diff[c.argmax] == diff.max()
    nb = np.linalg.norm(b)
    if nb > 0:
        assert c.rel_frobenius == pytest.approx(np.linalg.norm(a - b) / nb, rel=1e-9, abs=1e-15)
    na = np.linalg.norm(a)
    if na > 0 and nb > 0:
        assert c.cosine == pytest.approx(float((a * b).sum()) / (na * nb), rel=1e-9)
    assert c.within(diff.max()) and (diff.max() == 0 or not c.within(diff.max() / 2))


def test_compare_edge_cases():
    z = np.zeros((3, 3))
    c = compare_matrices(z, z)
    assert (c.max_abs_diff, c.rel_frobenius, c.cosine) == (0.0, 0.0, 1.0)
    c = compare_matrices(np.ones((3, 3)), z)
    assert c.rel_frobenius == float("inf") and c.cosine == 0.0
    n = np.ones((3, 3))
    n[1, 2] = np.nan
    c = compare_matrices(n, np.ones((3, 3)))
    assert np.isnan(c.max_abs_diff) and c.argmax == (1, 2) and not c.within(1e9)
    assert json.dumps(c.to_dict(), allow_nan=False)
    with pytest.raises(DataError, match="shape mismatch"):
        compare_matrices(np.ones((3, 4)), np.ones((4, 3)))
    with pytest.raises(DataError):
        compare_matrices(np.ones(3), np.ones(3))


def test_compare_store_with_checkpoints(tmp_path, write_safetensors):
    m = _matrix(3, 50, 20)
    url = str(tmp_path / "w.zarr")
    WeightsStore.create(url).write_matrix("lm_head", m, plan_grid(20, 50, 8))
    np.save(tmp_path / "m.npy", m)
    write_safetensors(tmp_path / "model.safetensors",
                      {"lm_head.weight": m, "model.embed_tokens.weight": m + 1, "model.norm.weight": m[0]})
    store = open_matrix(url)
    assert store.name == "lm_head" and store.grid == plan_grid(20, 50, 8)
    for other in (open_matrix(tmp_path / "m.npy"),
                  open_matrix(tmp_path / "model.safetensors", tensor="lm_head"),  # an alias
                  open_matrix(tmp_path / "model.safetensors", fallback="lm_head")):
        assert other.shape == (50, 20)
        c = compare_matrices(store.array, other.array, max_bytes=512)
        assert c.max_abs_diff == 0.0 and c.rel_frobenius == 0.0
    emb = open_matrix(tmp_path / "model.safetensors", tensor="embedding")
    assert compare_matrices(store.array, emb.array).max_abs_diff == pytest.approx(1.0)
    with pytest.raises(TensorNotFoundError):  # two matrices and no name
        open_matrix(tmp_path / "model.safetensors")


def test_cli_compare_takes_adapters(tmp_path, write_safetensors):
    """An adapter stands for its matrix at ρ = 1: a head adapter equals its source head bit for bit
    (its rows back in token order), a fitted adapter its Σ α_p W_p; --tensor names the other side."""
    from prismoe_store.grid import plan_pipes
    from prismoe_store.head.build import HeadConfig, build_head
    from prismoe_store.runtime.dense import dense_matrix
    from prismoe_store.stores.adapter import AdapterStore

    w = _matrix(5, 300, 24)
    write_safetensors(tmp_path / "model.safetensors", {"lm_head.weight": w, "model.embed_tokens.weight": w + 1})
    build_head(str(tmp_path / "model.safetensors"), str(tmp_path / "h.zarr"),
               config=HeadConfig(band_rows=16, tensor="lm_head"))
    r = _run("compare", tmp_path / "h.zarr", tmp_path / "model.safetensors", "--tensor", "lm_head", "-q", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["max_abs_diff"] == 0.0 and d["shape"] == [300, 24] and "head adapter" in d["a"]
    r = _run("compare", tmp_path / "model.safetensors", tmp_path / "h.zarr", "--tensor", "embedding", "-q")
    assert r.exit_code == 1 and "exceeds --atol" in r.output  # the embedding is w + 1

    a = AdapterStore.create(str(tmp_path / "a.zarr"), grids=plan_pipes(24, 40, 8), alphas=(0.5, 0.3, 0.2),
                            attrs={"complete": True})
    for p, g in enumerate(a.grids):
        for band in range(g.rows):
            a.write_band(p, band, _matrix(p * 100 + band, g.tile_out, g.d_in_pad))
    np.save(tmp_path / "dense.npy", dense_matrix(a).astype(np.float64) + 0.5)
    r = _run("compare", tmp_path / "a.zarr", tmp_path / "dense.npy", "-q", "--json", "--atol", "0.5")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["max_abs_diff"] == pytest.approx(0.5)

    r = _run("compare", tmp_path / "a.zarr", tmp_path / "dense.npy", "-q", "--int8")
    assert r.exit_code == 1 and "prismoe quantize" in r.output and "Traceback" not in r.output, r.output
    from prismoe_store.runtime.quant import dequantize_tile, quantize_adapter

    quantize_adapter(a)
    int8 = np.zeros((a.d_out, a.d_in))
    for p, (alpha, g) in enumerate(zip(a.alphas, a.grids, strict=True)):  # the runtime's INT8 matrix at ρ = 1
        for j in g.active_workers():
            rows, cols = g.valid_region(j)
            t = dequantize_tile(*a.read_tile_int8(p, j)).astype(np.float64)
            int8[rows, cols] += alpha * t[: rows.stop - rows.start, : cols.stop - cols.start]
    np.save(tmp_path / "int8.npy", int8.astype(np.float32))
    r = _run("compare", tmp_path / "a.zarr", tmp_path / "int8.npy", "-q", "--int8", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["max_abs_diff"] == 0.0, r.output
    r = _run("compare", tmp_path / "a.zarr", tmp_path / "int8.npy", "-q", "--json", "--atol", "1")
    err = json.loads(r.output)["max_abs_diff"]
    assert 0 < err < 0.1  # float32 tiles against their INT8 copy
    r = _run("compare", tmp_path / "a.zarr", tmp_path / "a.zarr", "-q", "--json", "--atol", "1", "--int8")
    assert r.exit_code == 0 and json.loads(r.output)["max_abs_diff"] == err  # --int8: A's INT8 tiles, B's float32
    r = _run("compare", tmp_path / "h.zarr", tmp_path / "model.safetensors", "--tensor", "lm_head", "-q", "--int8")
    assert r.exit_code == 1 and "prismoe quantize" in r.output

    AdapterStore.open(str(tmp_path / "a.zarr"), "r+").update_attrs(complete=False)
    r = _run("compare", tmp_path / "a.zarr", tmp_path / "dense.npy", "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output and "not finished" in r.output, r.output
    pairs = create_checked(str(tmp_path / "p.zarr"), "pairs", 1)
    assert pairs is not None
    r = _run("compare", tmp_path / "p.zarr", tmp_path / "dense.npy", "-q")
    assert r.exit_code == 1 and "is a pairs store: compare reads matrices" in r.output, r.output


# -- the CLI -----------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_compare_exit_codes(tmp_path):
    m = _matrix(4, 40, 16)
    url = tmp_path / "w.zarr"
    WeightsStore.create(url).write_matrix("lm_head", m, plan_grid(16, 40, 4))
    np.save(tmp_path / "same.npy", m)
    near = m.copy()
    near[7, 3] += 0.25
    np.save(tmp_path / "near.npy", near)
    np.save(tmp_path / "wide.npy", np.zeros((40, 17), np.float32))

    r = _run("compare", url, tmp_path / "same.npy", "-q")
    assert r.exit_code == 0, r.output
    assert "max abs diff" in r.output and "cosine" in r.output
    assert " at (" not in r.output  # no place named for a difference of 0
    r = _run("compare", url, tmp_path / "near.npy", "-q")
    assert r.exit_code == 1 and "exceeds --atol" in r.output and "(7, 3)" in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error:")  # one line, no traceback
    r = _run("compare", url, tmp_path / "near.npy", "--atol", "0.25", "-q", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["within_atol"] and d["max_abs_diff"] == pytest.approx(0.25) and d["argmax"] == [7, 3]
    r = _run("compare", url, tmp_path / "wide.npy", "-q")
    assert r.exit_code == 1 and "shape mismatch" in r.output and "Traceback" not in r.output
    r = _run("compare", url, tmp_path / "missing.npy", "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output
    r = _run("compare", url, tmp_path / "same.npy", "--tensor", "nope", "-q")
    assert r.exit_code == 1 and "lm_head" in r.output  # lists what the store has


def test_cli_inspect_json_and_plots(tmp_path):
    m = _matrix(5, 100, 40)
    url = tmp_path / "w.zarr"
    WeightsStore.create(url).write_matrix("lm_head", m, plan_grid(40, 100, 16))
    r = _run("inspect", url, "-q", "--json", "--plot", tmp_path / "plots")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    (t,) = d["tensors"]
    assert t["shape"] == [100, 40] and len(t["stats"]["norm"]) == 16
    np.testing.assert_allclose(t["stats"]["norm"], _reference_stats(m, plan_grid(40, 100, 16))["norm"], rtol=1e-12)
    assert len(d["plots"]) == 1
    _png_ok(d["plots"][0])
    r = _run("inspect", url, "-q")
    assert r.exit_code == 0 and "tile norms: min" in r.output
    create_checked(tmp_path / "other", "mystery", 1)
    r = _run("inspect", tmp_path / "other")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("Error: ") and "Error: StoreFormatError" not in r.output and "mystery" in r.output
    r = _run("inspect", url, "--plot", tmp_path / "p2", "--no-stats")
    assert r.exit_code == 2 and "--no-stats" in r.output

    chunk = url / "tensors" / "lm_head" / "c" / "1" / "1"  # a chunk file: corrupt it
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    r = _run("inspect", url, "-q", "--no-stats")  # metadata alone still reads
    assert r.exit_code == 0
    r = _run("inspect", url, "-q")
    assert r.exit_code == 1 and "CorruptStoreError" not in r.output and "Traceback" not in r.output
    assert r.output.startswith("Error: ") and "lm_head" in r.output


def test_cli_visualize(tmp_path):
    import torch

    rng = np.random.default_rng(6)
    np.save(tmp_path / "t3.npy", rng.standard_normal((5, 40, 30)).astype(np.float32))
    np.save(tmp_path / "m2.npy", rng.standard_normal((600, 90)).astype(np.float32))
    torch.save({"experts": torch.randn(3, 20, 10, dtype=torch.bfloat16), "bias": torch.zeros(3)},
               tmp_path / "e.pt")
    url = tmp_path / "w.zarr"
    WeightsStore.create(url).write_matrix("lm_head", _matrix(7, 50, 20), plan_grid(20, 50, 8))
    cases = [
        (["t3.npy"], "t3"),
        (["m2.npy", "--max-pixels", "64"], "m2"),  # reduced to blocks
        (["e.pt", "--tensor", "experts"], "experts"),
        (["w.zarr", "--prefix", "tiles"], "tiles"),
    ]
    for args, prefix in cases:
        r = _run("visualize", tmp_path / args[0], *args[1:], "-o", tmp_path / "viz", "-q")
        assert r.exit_code == 0, r.output
        for kind in ("slices", "hist"):
            _png_ok(tmp_path / "viz" / f"{prefix}_{kind}.png")
    r = _run("visualize", tmp_path / "e.pt", "-o", tmp_path / "viz")  # two tensors, none named
    assert r.exit_code == 1 and "experts" in r.output
    np.save(tmp_path / "v1.npy", np.zeros(5))
    r = _run("visualize", tmp_path / "v1.npy", "-o", tmp_path / "viz")
    assert r.exit_code == 1 and "2-D or 3-D" in r.output


# -- plots directly ----------------------------------------------------------------------------


def test_plots_write_pngs(tmp_path):
    mask = np.zeros((16, 32), bool)
    mask[-1, -4:] = True
    _png_ok(tile_heatmap(np.random.default_rng(0).random((16, 32)), tmp_path / "h.png", mask=mask, title="x"))
    _png_ok(tile_heatmap(np.arange(512.0).reshape(256, 2), tmp_path / "tall.png"))
    paths = visualize_tensor(np.random.default_rng(1).standard_normal((40, 8, 8)), tmp_path, prefix="p",
                             max_slices=4, hist_slices=100)
    for p in paths:
        _png_ok(p)


def test_open_tensor_views_a_store_as_tiles():
    url = _mem_url()
    m = _matrix(8, 10, 6)
    grid = GridSpec(d_in=6, d_out=10, rows=4, cols=2, tile_out=4, tile_in=4)
    WeightsStore.create(url).write_matrix("w", m, grid)
    stack = open_tensor(url).array
    assert stack.shape == (8, 4, 4)
    padded = np.zeros(grid.padded_shape, np.float32)
    padded[:10, :6] = m
    for j in range(grid.workers):
        band, sl = grid.tile_region(j)
        np.testing.assert_array_equal(stack[j], padded[band, sl])
        np.testing.assert_array_equal(stack[j, 1:3], padded[band, sl][1:3])
    assert stack.valid_shape(7) == (0, 2) and stack.valid_shape(0) == (4, 4)


# -- pairs stores: per-column statistics -------------------------------------------------------


def _finite_column_reference(a: np.ndarray) -> dict[str, np.ndarray]:
    """Per-column statistics over the finite values, the plain NumPy way (float64)."""
    a = a.astype(np.float64)
    fin = np.isfinite(a)
    ref = {"count": fin.sum(0), "nonfinite": (~fin).sum(0)}
    ref["mean"], ref["std"], ref["absmax"] = (np.full(a.shape[1], np.nan) for _ in range(3))
    for j in range(a.shape[1]):
        v = a[fin[:, j], j]
        if v.size:
            ref["mean"][j], ref["std"][j], ref["absmax"][j] = v.mean(), v.std(), np.abs(v).max()
    return ref


def _messy(seed: int, rows: int, cols: int) -> np.ndarray:
    """Float32 rows with column-dependent scale and offset, some NaN/Inf and a constant column."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 50, cols) + rng.uniform(-5, 5, cols))
    a = a.astype(np.float32)
    bad = rng.random(a.shape) < 0.03
    a[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
    if cols > 1:
        a[:, 1] = 3.0
    return a


def _assert_columns_match(s, a: np.ndarray) -> None:
    ref = _finite_column_reference(a)
    np.testing.assert_array_equal(s.count, ref["count"])
    np.testing.assert_array_equal(s.nonfinite, ref["nonfinite"])
    for k in ("mean", "std", "absmax"):
        np.testing.assert_allclose(getattr(s, k), ref[k], rtol=1e-10, atol=1e-9, equal_nan=True, err_msg=k)
    a64 = a.astype(np.float64)
    fin = np.isfinite(a64)
    # the block heatmap: RMS of the finite values of each (row bin, column bin), edges covering all
    assert s.row_edges[0] == 0 and s.row_edges[-1] == a.shape[0] and np.all(np.diff(s.row_edges) > 0)
    assert s.col_edges[0] == 0 and s.col_edges[-1] == a.shape[1] and np.all(np.diff(s.col_edges) > 0)
    for i in range(len(s.row_edges) - 1):
        for k in range(len(s.col_edges) - 1):
            blk = a64[s.row_edges[i]:s.row_edges[i + 1], s.col_edges[k]:s.col_edges[k + 1]]
            v = blk[np.isfinite(blk)]
            want = np.sqrt(np.mean(v * v)) if v.size else np.nan
            np.testing.assert_allclose(s.block_rms[i, k], want, rtol=1e-10, equal_nan=True)
    m = s.summary()
    v = a64[fin]
    assert m["values"] == v.size and m["nonfinite"] == int((~fin).sum())
    if v.size:
        assert m["mean"] == pytest.approx(v.mean(), rel=1e-9, abs=1e-9)
        assert m["std"] == pytest.approx(v.std(), rel=1e-9)
    else:
        assert m["mean"] is None and m["std"] is None
    assert m["nonfinite_share"] == pytest.approx((~fin).mean())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 20), chunk_r=st.integers(1, 16), chunk_c=st.integers(1, 8),
       seed=st.integers(0, 2**31), max_bytes=st.sampled_from([1, 500, 10**9]), row_bins=st.integers(1, 9))
def test_column_stats_match_numpy(rows, cols, chunk_r, chunk_c, seed, max_bytes, row_bins):
    a = _messy(seed, rows, cols)
    z = zarr.create_array(zarr.storage.MemoryStore(), shape=a.shape, chunks=(chunk_r, chunk_c), dtype="float32")
    z[...] = a
    calls = []
    s = column_stats(z, max_bytes=max_bytes, row_bins=row_bins, col_bins=7,
                     progress=lambda d, t: calls.append((d, t)))
    _assert_columns_match(s, a)
    assert s.block_rms.shape[0] <= row_bins and s.block_rms.shape[1] <= 7
    assert [d for d, _ in calls] == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]
    json.dumps(s.to_dict(), allow_nan=False)
    part = column_stats(z, rows=max(1, rows // 2), max_bytes=max_bytes)  # a leading share of the rows only
    _assert_columns_match(part, a[:max(1, rows // 2)])


def _pairs_store(path, seed: int = 0, rows=(40, 25, 30), d_in=13, d_out=21):
    from prismoe_store.stores.pairs import PairsStore

    p = PairsStore.create(path, d_in=d_in, d_out=d_out, rows_per_chunk=16, col_chunks=(8, 8),
                          options=StoreOptions(compressor="zstd"),
                          provenance={"upper": {"model": "tiny", "layer": 2}, "texts": ["a.txt", "b.txt"]})
    xs, zs = [], []
    for i, n in enumerate(rows):
        x, z = _messy(seed + i, n, d_in), _messy(seed + 100 + i, n, d_out)
        p.append(x, z)
        xs.append(x)
        zs.append(z)
    return p, np.concatenate(xs), np.concatenate(zs)


def test_inspect_pairs_store(tmp_path):
    url = tmp_path / "p.zarr"
    p, x, z = _pairs_store(url)
    # a cut-off append: rows written past the committed count must not enter the statistics
    p.x.resize((x.shape[0] + 10, x.shape[1]))
    p.x[x.shape[0]:] = 1e6
    assert store_format(url) == "pairs"
    calls = []
    rep = inspect_store(url, max_bytes=64, progress=lambda d, t: calls.append((d, t)))
    assert (rep.rows, rep.capacity, rep.d_in, rep.d_out, rep.rows_per_chunk) == (95, 105, 13, 21, 16)
    assert rep.chunks == {"x": [16, 8], "z": [16, 8]}
    assert rep.codecs["x"][0].startswith("zstd") and rep.codecs["z"][-1] == "crc32c"
    assert rep.bytes_memory == x.nbytes + z.nbytes and rep.bytes_disk > 0
    assert rep.provenance == {"upper": {"model": "tiny", "layer": 2}, "texts": ["a.txt", "b.txt"]}
    _assert_columns_match(rep.stats["x"], x)
    _assert_columns_match(rep.stats["z"], z)
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == list(range(1, len(calls) + 1))
    assert len({t for _, t in calls}) == 1  # one total for both arrays

    text = rep.text()
    for want in ("95 rows committed (arrays hold 105", "x [95, 13], z [95, 21]", "model: tiny", "layer: 2",
                 "texts: [a.txt, b.txt]", "non-finite", "1 constant column(s)", "largest std"):
        assert want in text, want
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["format"] == "pairs" and d["rows"] == 95 and len(d["stats"]["z"]["std"]) == 21
    assert d["stats"]["x"]["summary"]["nonfinite"] == int((~np.isfinite(x)).sum())

    only = inspect_store(url, tensor="z", stats=False)
    assert only.stats == {} and "x:" not in only.text()
    assert list(inspect_store(url, tensor="z").stats) == ["z"]
    with pytest.raises(TensorNotFoundError, match="x, z"):
        inspect_store(url, tensor="w")

    (url / "z" / "c" / "2" / "1").unlink()  # a missing chunk under the committed rows is damage, not zeros
    with pytest.raises(CorruptStoreError, match="missing"):
        inspect_store(url, tensor="z")


def test_inspect_empty_pairs_store():
    from prismoe_store.stores.pairs import PairsStore

    url = _mem_url()
    PairsStore.create(url, d_in=3, d_out=2)
    rep = inspect_store(url)
    assert rep.rows == 0 and rep.stats["x"].summary()["mean"] is None
    assert "x: no finite values" in rep.text()
    json.dumps(rep.to_dict(), allow_nan=False)


# -- adapter stores ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small pairs store and an adapter fitted on it (gates and INT8 added by the tests that need them)."""
    from prismoe_store.fit import FitConfig, fit
    from prismoe_store.stores.pairs import PairsStore

    root = tmp_path_factory.mktemp("adapter")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 12)).astype(np.float32)
    pairs = PairsStore.create(root / "p.zarr", d_in=12, d_out=10, rows_per_chunk=64)
    pairs.append(x, x @ rng.standard_normal((12, 10)).astype(np.float32) + 0.1 * rng.standard_normal((400, 10)))
    grids = [GridSpec(d_in=12, d_out=10, rows=2, cols=2, tile_out=8, tile_in=8)] * 2 + \
            [GridSpec(d_in=12, d_out=10, rows=4, cols=1, tile_out=4, tile_in=16)]  # pipe 3: a padding-only band
    adapter = fit(pairs, root / "a.zarr", FitConfig(grids=grids), scheduler="synchronous")
    return root, pairs, adapter


def _check_pipe_norms(rep, adapter) -> None:
    for p, pr in enumerate(rep.pipes):
        g = adapter.grids[p]
        assert pr.grid == g
        dense = np.asarray(adapter.tiles(p)[...], np.float64)[:g.d_out, :g.d_in]
        for j in range(g.workers):
            rows, cols = g.valid_region(j)
            np.testing.assert_allclose(pr.stats.norm[j], np.linalg.norm(dense[rows, cols]), rtol=1e-12)
        assert pr.stats.padding.tolist() == [g.is_padding(j) for j in range(g.workers)]


def test_inspect_adapter_store(fitted, tmp_path):
    import shutil

    from prismoe_store.gates.settings import GateSettings
    from prismoe_store.gates.training import fit_gates
    from prismoe_store.runtime.quant import quantize_adapter
    from prismoe_store.stores.adapter import AdapterStore

    root, pairs, _ = fitted
    url = tmp_path / "a.zarr"  # a copy: gates and INT8 tiles are added below
    shutil.copytree(root / "a.zarr", url)
    adapter = AdapterStore.open(url, "r+")
    assert store_format(url) == "adapter"
    rep = inspect_store(url, max_bytes=1)
    assert (rep.d_in, rep.d_out, rep.mode, rep.complete, len(rep.pipes)) == (12, 10, "joint", True, 3)
    assert rep.fit == adapter.attrs()["fit"] and rep.metrics == adapter.attrs()["metrics"]
    assert rep.gates == {} and all(p.gate is None and p.int8_bytes_memory is None for p in rep.pipes)
    _check_pipe_norms(rep, adapter)
    assert rep.pipes[2].stats.padding.tolist() == [False, False, False, True]
    text = rep.text()
    for want in ("12 → 10", "joint tiles", "complete", "solver cholesky", "held-out metrics", "combined",
                 "gates: none", "1 padding-only", "fitted on", "tile norms"):
        assert want in text, want

    fit_gates(adapter, pairs, GateSettings(sparsity=0.5, epochs=1))
    quantize_adapter(adapter)
    rep = inspect_store(url)
    assert rep.gates["settings"]["sparsity"] == 0.5 and rep.int8["complete"]
    for p, pr in enumerate(rep.pipes):
        w, b = adapter.read_gate(p)
        assert pr.gate["shape"] == [pr.grid.workers, 12]
        assert pr.gate["weight_norm"] == pytest.approx(np.linalg.norm(w.astype(np.float64)), rel=1e-12)
        assert (pr.gate["bias_min"], pr.gate["bias_max"]) == (float(b.min()), float(b.max()))
        a, bb = pr.grid.tile_shape
        assert pr.tile_bytes_int8 == a * bb + 4 * a
        assert pr.int8_bytes_memory == pr.grid.d_out_pad * pr.grid.d_in_pad + 4 * pr.grid.d_out_pad * pr.grid.cols
    text = rep.text()
    for want in ("gates: trained", "sparsity 0.5", "held-out relative error", "INT8 with scales",
                 "INT8: ", "‖W_g‖_F"):
        assert want in text, want
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["format"] == "adapter" and [p["name"] for p in d["pipes"]] == ["pipe1", "pipe2", "pipe3"]
    assert d["pipes"][0]["tile_bytes_fp32"] == 8 * 8 * 4 and d["pipes"][2]["padding_workers"] == 1

    one = inspect_store(url, tensor="pipe3", stats=False)
    assert [p.pipe for p in one.pipes] == [2] and one.pipes[0].stats is None and one.pipes[0].gate == {
        "shape": [4, 12]}
    with pytest.raises(TensorNotFoundError, match="pipe1, pipe2, pipe3"):
        inspect_store(url, tensor="pipe4")


def test_inspect_incomplete_adapter():
    from prismoe_store.stores.adapter import AdapterStore

    url = _mem_url()
    AdapterStore.create(url, grids=[plan_grid(6, 10, 8)])
    rep = inspect_store(url)
    assert not rep.complete and rep.pipes[0].stats is None
    assert "INCOMPLETE" in rep.text() and "fit: none recorded" in rep.text()


def test_inspect_an_interrupted_fit(tmp_path):
    """An adapter whose fit stopped in its pass names its pairs but no row-set counts yet (they are
    recorded at the end), and says how to finish it."""
    from prismoe_store.bench.fit import write_pairs
    from prismoe_store.fit import FitConfig, fit

    pairs = write_pairs(str(tmp_path / "p.zarr"), 600, 8, 16)

    with pytest.raises(Interrupted):
        fit(pairs, str(tmp_path / "a.zarr"), FitConfig(workers=4, block_rows=128), progress=at_first_work,
            scheduler="synchronous")
    text = inspect_store(str(tmp_path / "a.zarr")).text()
    assert "INCOMPLETE" in text and "(600 rows): rows per set (train, sub, holdout) are recorded when" in text
    assert "):  rows" not in text


# -- the CLI on pairs and adapters -------------------------------------------------------------


def test_cli_inspect_pairs(tmp_path):
    url = tmp_path / "p.zarr"
    _, x, z = _pairs_store(url, rows=(70,), d_in=40, d_out=1500)  # z wide enough for the binned profile
    r = _run("inspect", url, "-q", "--json", "--plot", tmp_path / "plots")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    np.testing.assert_allclose(d["stats"]["x"]["std"], _finite_column_reference(x)["std"], rtol=1e-10)
    assert sorted(os.path.basename(p) for p in d["plots"]) == ["pairs_blocks.png", "pairs_columns.png"]
    for p in d["plots"]:
        _png_ok(p)
    r = _run("inspect", url, "--no-stats")
    assert r.exit_code == 0 and "70 rows committed" in r.output and "column std" not in r.output
    r = _run("inspect", url, "--routing", url)
    assert r.exit_code == 2 and "--routing needs an adapter store" in r.output


def test_cli_inspect_adapter_and_routing(fitted):
    from prismoe_store.gates.report import routing_report
    from prismoe_store.gates.settings import GateSettings
    from prismoe_store.gates.training import fit_gates

    root, pairs, adapter = fitted
    url, purl = root / "a.zarr", root / "p.zarr"
    if adapter.read_gate(0) is None:
        fit_gates(adapter, pairs, GateSettings(sparsity=0.5, epochs=1))
    r = _run("inspect", url, "-q", "--plot", root / "plots")
    assert r.exit_code == 0, r.output
    assert "pipe 3: 4×1 grid" in r.output and r.output.count("wrote ") == 3
    for p in range(1, 4):
        _png_ok(root / "plots" / f"pipe_{p}_tile_norms.png")

    r = _run("inspect", url, "-q", "--json", "--routing", purl, "--sparsity", "0.25", "--plot", root / "rt")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["format"] == "adapter" and d["routing"]["sparsity"] == 0.25
    want = routing_report(str(url), str(purl), sparsity=0.25, quality=False)
    for got, ref in zip(d["routing"]["pipes"], want["pipes"]):
        np.testing.assert_allclose(got["utilization"], ref["utilization"], rtol=1e-12)
        assert got["k"] == ref["k"]
    assert "quality" in d["routing"]
    names = sorted(os.path.basename(p) for p in d["routing"]["plots"])
    assert names == ["quality.png", "routing_histograms.png", "routing_utilization.png"]
    for p in d["routing"]["plots"]:
        _png_ok(p)

    r = _run("inspect", url, "-q", "--routing", purl, "--no-stats")
    assert r.exit_code == 0, r.output
    assert "routing of" in r.output and "held-out quality" in r.output and "tile norms" not in r.output
    r = _run("inspect", url, "--sparsity", "0.5")
    assert r.exit_code == 2 and "--sparsity goes with --routing" in r.output
    r = _run("inspect", url, "-q", "--routing", root / "missing.zarr")
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_inspect_adapter_counts_the_memory_of_tiles_that_hold_data(tmp_path):
    """A padded grid: inspect gives the bytes of the tiles the runtime loads (those holding data),
    with the padded array's beside them, fp32 and INT8."""
    from prismoe_store.bench.runtime import synthetic_adapter
    from prismoe_store.inspection.adapter import inspect_adapter

    a = synthetic_adapter(str(tmp_path / "a.zarr"), d_in=24, d_out=40, workers=16)
    report = inspect_adapter(a.url, stats=False)
    for pipe in report.pipes:
        g = pipe.grid
        assert g.active_count < g.workers  # the test needs padding-only tiles
        live = g.active_count * g.tile_bytes(4)
        d = pipe.to_dict()
        assert d["bytes_live"] == live < d["bytes_memory"] == g.workers * g.tile_bytes(4)
        text = pipe.text()
        assert f"(the {g.active_count} that hold data; " in text
        int8_live = g.active_count * (g.tile_out * g.tile_in + 4 * g.tile_out)
        assert f"INT8 tiles + scales {human_bytes(int8_live)} in memory (the tiles that hold data)" in text
