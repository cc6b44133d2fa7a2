"""The one dense-matrix builder (``prismoe_store.runtime.dense``): a head's rows in token order, and
for fitted adapters ``Σ_p α_p s_p W_p`` against a reference built from the routing weights of a
uniform gate (joint and independent tiles), and against the runtime at ρ = 1."""

import numpy as np
import pytest
import torch

from prismoe_store.gates.routing import route
from prismoe_store.grid import plan_grid, plan_pipes
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.runtime import UniformGate, dense_matrix, open_runtime
from prismoe_store.stores.adapter import AdapterStore


def _adapter(path, mode, *, d_in=24, d_out=40, workers=8, gates=False):
    grids = plan_pipes(d_in, d_out, workers)
    a = AdapterStore.create(str(path), grids=grids, mode=mode, alphas=(0.5, 0.3, 0.2), attrs={"complete": True})
    rng = np.random.default_rng(3)
    for p, g in enumerate(grids):
        for r in range(g.rows):
            a.write_band(p, r, rng.standard_normal((g.tile_out, g.d_in_pad)).astype(np.float32))
        if gates:
            a.write_gate(p, rng.standard_normal((g.workers, d_in)).astype(np.float32), rng.standard_normal(g.workers))
    return a


def _reference(a) -> np.ndarray:
    """float64 ``Σ_p α_p Σ_j w_j T_j`` with ``w_j`` the routing weights of a zero gate at ρ = 1."""
    w = np.zeros((a.d_out, a.d_in))
    for p, (alpha, g) in enumerate(zip(a.alphas, a.grids, strict=True)):
        r = route(torch.zeros(1, a.d_in), torch.zeros(g.workers, a.d_in), torch.zeros(g.workers), grid=g,
                  sparsity=1.0, mode=a.mode)
        weights = r.dense_weights()[0].double().numpy()  # [workers]
        full = np.zeros(g.padded_shape)
        for j in range(g.workers):
            full[g.tile_region(j)] += weights[j] * a.read_tile(p, j).astype(np.float64)
        w += alpha * full[: a.d_out, : a.d_in]
    return w


def test_dense_matrix_of_a_head_is_the_source_in_token_order(tmp_path):
    w = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=16))
    got = dense_matrix(AdapterStore.open(str(tmp_path / "h.zarr")))
    assert got.dtype == np.float32 and np.array_equal(got, w)


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_dense_matrix_matches_the_routing_reference(tmp_path, mode):
    a = _adapter(tmp_path / "a.zarr", mode)
    got = dense_matrix(a)
    assert got.dtype == np.float32 and got.shape == (a.d_out, a.d_in)
    np.testing.assert_allclose(got, _reference(a), rtol=1e-6, atol=1e-6)


def test_independent_tiles_are_scaled_by_the_live_columns(tmp_path):
    """The scale the second builder missed: each band averages its C_live tiles (C_live > 1 here)."""
    joint, indep = _adapter(tmp_path / "j.zarr", "joint"), _adapter(tmp_path / "i.zarr", "independent")
    assert all(-(-g.d_in // g.tile_in) > 1 for g in indep.grids)
    plain = sum(alpha * indep.dense(p).astype(np.float64) for p, alpha in enumerate(indep.alphas))
    np.testing.assert_allclose(dense_matrix(joint), plain, rtol=1e-6, atol=1e-6)  # same tiles, weight 1
    scaled = sum(alpha * indep.dense(p).astype(np.float64) / -(-g.d_in // g.tile_in)
                 for p, (alpha, g) in enumerate(zip(indep.alphas, indep.grids, strict=True)))
    np.testing.assert_allclose(dense_matrix(indep), scaled, rtol=1e-6, atol=1e-6)
    assert not np.allclose(dense_matrix(indep), plain, atol=1e-3)


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_dense_matrix_is_what_the_runtime_computes_at_rho_1(tmp_path, mode):
    """Without gates (or behind a uniform gate) the runtime at ρ = 1 computes the dense matrix."""
    a = _adapter(tmp_path / "a.zarr", mode, gates=True)
    x = torch.randn(5, a.d_in)
    with open_runtime(UniformGate(a), sparsity=1.0) as rt:
        y = rt(x)
    torch.testing.assert_close(y, x @ torch.from_numpy(dense_matrix(a)).T, rtol=1e-4, atol=1e-4)


def test_dense_matrix_ignores_padding(tmp_path):
    g = plan_grid(6, 10, 8)
    a = AdapterStore.create(str(tmp_path / "p.zarr"), grids=[g], attrs={"complete": True})
    a.write_band(0, g.rows - 1, np.full((g.tile_out, g.d_in_pad), 5, np.float32))  # partly padding
    w = dense_matrix(a)
    assert w.shape == (10, 6)
    last = (g.rows - 1) * g.tile_out
    assert np.all(w[last:] == 5) and np.all(w[:last] == 0)


@pytest.mark.parametrize("kind", ["joint", "independent", "head"])
def test_dense_view_blocks_are_the_dense_matrix(tmp_path, kind):
    """Any block of the lazy view equals the same block of the whole matrix, bit for bit; a head's
    view keeps no more bands than its cache allows."""
    from prismoe_store.runtime.dense import DenseView

    if kind == "head":
        w = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
        np.save(tmp_path / "w.npy", w)
        build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=16))
        a = AdapterStore.open(str(tmp_path / "h.zarr"))
    else:
        a = _adapter(tmp_path / "a.zarr", kind)
    whole = dense_matrix(a)
    band_bytes = 16 * a.d_in * 4
    view = DenseView(a, cache_bytes=2 * band_bytes)
    rng = np.random.default_rng(1)
    for _ in range(20):
        r0, r1 = sorted(rng.integers(0, a.d_out + 1, 2))
        c0, c1 = sorted(rng.integers(0, a.d_in + 1, 2))
        got = view[r0:r1, c0:c1]
        assert got.dtype == np.float32 and got.shape == (r1 - r0, c1 - c0)
        assert np.array_equal(got, whole[r0:r1, c0:c1]), (r0, r1, c0, c1)
        assert sum(b.nbytes for b in view._bands.values()) <= 2 * band_bytes
    assert np.array_equal(view[-7:], whole[-7:])  # negative bounds as NumPy reads them
    with pytest.raises(IndexError):
        view[::2]


def test_dense_view_of_int8_tiles_is_what_the_int8_runtime_computes_at_rho_1(tmp_path):
    """``int8=True`` reads the dequantized INT8 tiles: at ρ = 1 the INT8 runtime computes x times it."""
    from prismoe_store.runtime.dense import DenseView

    w = np.random.default_rng(0).standard_normal((100, 12)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    build_head(str(tmp_path / "w.npy"), str(tmp_path / "h.zarr"), config=HeadConfig(band_rows=16, int8=True))
    head = AdapterStore.open(str(tmp_path / "h.zarr"))
    for a in (head, _adapter(tmp_path / "a.zarr", "joint")):
        x = torch.randn(7, a.d_in)
        if a is not head:
            from prismoe_store.runtime.quant import quantize_adapter

            quantize_adapter(a)
        m8 = torch.from_numpy(DenseView(a, int8=True)[:, :])
        assert not torch.equal(m8, torch.from_numpy(dense_matrix(a)))  # INT8 rounding shows
        with open_runtime(a, sparsity=1.0, quant="int8") as rt:
            torch.testing.assert_close(rt(x), x @ m8.T, rtol=1e-4, atol=1e-4)
