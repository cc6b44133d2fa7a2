"""INT8 quantization: the per-element error bound, and writing an adapter's INT8 tiles resumably."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from prismoe_store.errors import DataError
from prismoe_store.grid import plan_grid
from prismoe_store.runtime.quant import QMAX, dequantize_tile, int8_ready, quantize_adapter, quantize_tile
from prismoe_store.stores.adapter import AdapterStore

finite32 = st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 16)), elements=finite32))
def test_round_trip_error_at_most_half_a_scale(tile):
    q, s = quantize_tile(tile)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (tile.shape[0],)
    assert np.abs(q.astype(np.int32)).max() <= QMAX
    err = np.abs(q.astype(np.float64) * s.astype(np.float64)[:, None] - tile.astype(np.float64))
    bound = s.astype(np.float64)[:, None] / 2
    assert (err <= bound * (1 + 1e-6) + 1e-45).all()
    back = dequantize_tile(q, s)
    assert back.dtype == np.float32 and back.shape == tile.shape


def test_row_absmax_is_exact_and_zero_rows_stay_zero():
    t = np.array([[3.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-2.0, 2.0, 1e-9]], np.float32)
    q, s = quantize_tile(t)
    assert q[0, 0] == 127 and q[2, 0] == -127 and q[2, 1] == 127
    assert s[1] == 0 and (q[1] == 0).all() and (dequantize_tile(q, s)[1] == 0).all()


def test_torch_dequantize_matches_numpy():
    torch = pytest.importorskip("torch")
    t = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    q, s = quantize_tile(t)
    got = dequantize_tile(torch.from_numpy(q), torch.from_numpy(s)).numpy()
    np.testing.assert_array_equal(got, dequantize_tile(q, s))


def test_rejects_bad_tiles():
    with pytest.raises(DataError):
        quantize_tile(np.ones(4, np.float32))
    with pytest.raises(DataError):
        quantize_tile(np.array([[np.nan, 1.0]], np.float32))


def _adapter(path, seed=0):
    g = plan_grid(10, 20, 8)  # padded 16 -> 32 cols / rows: some tiles are wholly padding
    a = AdapterStore.create(str(path), grids=[g, plan_grid(10, 20, 8, layout="wide")], attrs={"complete": True})
    rng = np.random.default_rng(seed)
    for p, gp in enumerate(a.grids):
        for r in range(gp.rows):
            a.write_band(p, r, rng.standard_normal((gp.tile_out, gp.d_in_pad)).astype(np.float32))
    return a


def test_quantize_adapter_writes_every_live_tile(tmp_path):
    a = _adapter(tmp_path / "a.zarr")
    assert not int8_ready(a)
    calls = []
    rep = quantize_adapter(a, progress=lambda d, t: calls.append((d, t)))
    assert int8_ready(a) and a.has_int8
    total = sum(g.active_count for g in a.grids)  # the tiles holding data: padding-only ones are not counted
    assert calls[-1] == (total, total) and total < sum(g.workers for g in a.grids)
    assert rep.tiles == sum(g.active_count for g in a.grids) and rep.skipped == 0
    assert 0 < rep.max_rel_error < 0.01
    assert rep.bytes_fp32 == sum(g.active_count * g.tile_out * g.tile_in * 4 for g in a.grids)
    assert rep.bytes_int8 == sum(g.active_count * g.tile_out * (g.tile_in + 4) for g in a.grids)
    for p, g in enumerate(a.grids):
        for j in g.active_workers():
            q, s = a.read_tile_int8(p, j)
            q_ref, s_ref = quantize_tile(a.read_tile(p, j))
            np.testing.assert_array_equal(q, q_ref)
            np.testing.assert_array_equal(s, s_ref)


def test_quantize_adapter_stores_no_padding_only_tile(tmp_path):
    """Like the fit's tiles: one INT8 chunk (and one scales chunk) per live tile, none for a tile
    wholly in the padding; a re-run finds nothing missing or damaged."""
    import os

    a = _adapter(tmp_path / "a.zarr")
    quantize_adapter(a)
    assert a.grids[0].active_count < a.grids[0].workers  # pipe 1 has padding-only tiles
    for p, g in enumerate(a.grids):
        for name in ("tiles_int8", "scales"):
            root = tmp_path / "a.zarr" / f"pipe{p + 1}" / name / "c"
            stored = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
            assert stored == sorted(f"{j // g.cols}/{j % g.cols}" for j in g.active_workers()), (p, name)
    again = quantize_adapter(AdapterStore.open(str(tmp_path / "a.zarr"), "r+"))
    assert again.tiles == 0 and again.skipped == sum(g.active_count for g in a.grids)


def test_quantize_adapter_resumes_without_redoing_tiles(tmp_path):
    a = _adapter(tmp_path / "a.zarr")
    g = a.grids[0]
    # an interrupted run: two tiles of pipe 0 were written and recorded, nothing else
    done = g.active_workers()[:2]
    for j in done:
        a.write_tile_int8(0, j, *quantize_tile(a.read_tile(0, j)))
        a.progress("quantize_pipe0", g.workers).mark(j)
    rep = quantize_adapter(AdapterStore.open(str(tmp_path / "a.zarr"), "r+"))
    assert rep.skipped == 2
    assert rep.tiles == sum(gp.active_count for gp in a.grids) - 2
    again = quantize_adapter(AdapterStore.open(str(tmp_path / "a.zarr"), "r+"))
    # a finished run counts what the first counted: tiles holding data (padding-only ones are left out;
    # it said "quantized 86 tiles", then "already complete (192 tiles)")
    assert again.tiles == 0 and again.skipped == rep.tiles + rep.skipped == sum(gp.active_count for gp in a.grids)
    assert any(gp.active_count < gp.workers for gp in a.grids)  # the adapter has padding-only tiles
