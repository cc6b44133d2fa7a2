"""The TileSource contract, run against every implementation: an adapter store (fp32; INT8 tiles;
independent tiles with gates), the host-RAM wrapper, the uniform-gate wrapper, a recording wrapper
and a head adapter (also behind the recording wrapper).

Each must have every member of the protocol; serve tiles, INT8 tiles and gates with the shapes and
dtypes the protocol documents; have grids consistent with ``d_in``/``d_out`` and ``attrs()`` a dict;
and the runtime over it must give the dense reference at full density (ρ = 1, uniform gate)."""

from __future__ import annotations

from typing import Generic, Protocol

import numpy as np
import pytest
import torch
from tile_sources import Recording

from prismoe_store.errors import PrismoeError
from prismoe_store.grid import plan_grid
from prismoe_store.head.build import HeadConfig, build_head
from prismoe_store.runtime import (
    BandSource,
    HostTiles,
    TileSource,
    TileSourceWrapper,
    UniformGate,
    dense_matrix,
    open_runtime,
    quantize_adapter,
)
from prismoe_store.runtime.dense import tile_scale
from prismoe_store.runtime.quant import dequantize_tile
from prismoe_store.stores.adapter import AdapterStore

D_IN, D_OUT = 20, 36  # odd widths: every grid pads


def _members(protocol) -> list[str]:
    """The protocol's own and inherited members."""
    own = [c for c in protocol.__mro__ if c not in (object, Protocol, Generic)]
    return sorted({n for c in own for n in vars(c) if not n.startswith("_")})


def _fitted(path, *, mode="joint", gates=False, int8=False, seed=0) -> AdapterStore:
    grids = [plan_grid(D_IN, D_OUT, 8), plan_grid(D_IN, D_OUT, 4), plan_grid(D_IN, D_OUT, 8, layout="wide")]
    a = AdapterStore.create(str(path), grids=grids, mode=mode, alphas=(0.5, 0.3, 0.2), attrs={"complete": True})
    rng = np.random.default_rng(seed)
    for p, g in enumerate(grids):
        for r in range(g.rows):
            a.write_band(p, r, rng.standard_normal((g.tile_out, g.d_in_pad)).astype(np.float32))
        if gates:
            a.write_gate(p, rng.standard_normal((g.workers, D_IN)).astype(np.float32),
                         rng.standard_normal(g.workers).astype(np.float32))
    if gates:
        a.update_attrs(gates={"complete": True, "settings": {"sparsity": 0.5}})
    if int8:
        quantize_adapter(a)
    return a


def _head(folder) -> AdapterStore:
    w = np.random.default_rng(7).standard_normal((D_OUT + 5, D_IN)).astype(np.float32)  # a short last band
    np.save(folder / "w.npy", w)
    return build_head(str(folder / "w.npy"), str(folder / "h.zarr"), config=HeadConfig(band_rows=8)) and \
        AdapterStore.open(str(folder / "h.zarr"))


SOURCES = {
    "store fp32": lambda d: _fitted(d / "a.zarr"),
    "store int8": lambda d: _fitted(d / "a.zarr", int8=True),
    "store independent, gates": lambda d: _fitted(d / "a.zarr", mode="independent", gates=True),
    "host RAM": lambda d: HostTiles(_fitted(d / "a.zarr", gates=True, int8=True), int8=True),
    "host RAM, no int8": lambda d: HostTiles(_fitted(d / "a.zarr"), int8=False),
    "uniform gate": lambda d: UniformGate(_fitted(d / "a.zarr", mode="independent", gates=True)),
    "recording": lambda d: Recording(_fitted(d / "a.zarr", mode="independent", gates=True, int8=True)),
    "head": lambda d: _head(d),
    "recording head": lambda d: Recording(_head(d)),
}


HEADS = ("head", "recording head")  # the sources with bands (partition layout)
INT8 = ("store int8", "host RAM", "recording")  # the fitted sources serving INT8 tiles


@pytest.fixture(params=list(SOURCES), scope="module")
def source(request, tmp_path_factory):
    return SOURCES[request.param](tmp_path_factory.mktemp("src"))


@pytest.fixture(params=HEADS, scope="module")
def head_source(request, tmp_path_factory):
    return SOURCES[request.param](tmp_path_factory.mktemp("head"))


@pytest.fixture(params=INT8, scope="module")
def int8_source(request, tmp_path_factory):
    return SOURCES[request.param](tmp_path_factory.mktemp("int8"))


def _has_int8(src) -> bool:
    store = src
    while isinstance(store, TileSourceWrapper):
        if isinstance(store, HostTiles):
            return store.int8 is not None
        store = store.inner
    return store.has_int8


def _partition(src) -> bool:
    return src.layout == "partition"


def test_the_wrapper_base_forwards_every_member():
    assert {"attrs", "read_tile", "read_tile_int8", "read_gate", "grids", "layout"} <= set(_members(TileSource))
    assert set(_members(TileSource)) < set(_members(BandSource))
    assert set(_members(BandSource)) <= set(vars(TileSourceWrapper))


def test_every_member_is_present(source):
    assert isinstance(source, TileSource)
    for name in _members(TileSource):
        assert hasattr(source, name), name
    if _partition(source):
        assert isinstance(source, BandSource)
        for name in _members(BandSource):
            assert hasattr(source, name), name


def test_shape_grids_and_records(source):
    assert isinstance(source.d_in, int) and isinstance(source.d_out, int)
    assert (source.d_in, source.d_out) == (D_IN, D_OUT if not _partition(source) else D_OUT + 5)
    assert source.layout in ("ensemble", "partition") and source.mode in ("joint", "independent")
    grids, alphas = source.grids, source.alphas
    assert len(grids) == len(alphas) >= 1 and sum(alphas) == pytest.approx(1.0)
    assert all(g.d_in == source.d_in for g in grids)
    if _partition(source):
        assert sum(g.d_out for g in grids) == source.d_out
        assert source.n_bands == -(-source.d_out // source.band_rows)
    else:
        assert all(g.d_out == source.d_out for g in grids)
    assert isinstance(source.attrs(), dict)


def test_tiles_int8_tiles_and_gates(source):
    for p, g in enumerate(source.grids):
        a, b = g.tile_shape
        for j in g.active_workers():
            t = source.read_tile(p, j)
            assert t.dtype == np.float32 and t.shape[1] == b
            rows = g.valid_region(j)[0]
            assert t.shape[0] == (a if not g.is_band_grid else rows.stop - rows.start)
            assert np.isfinite(t).all()
            if _has_int8(source):
                q, s = source.read_tile_int8(p, j)
                assert q.dtype == np.int8 and q.shape == t.shape
                assert s.dtype == np.float32 and s.shape == (t.shape[0],)
                back = dequantize_tile(q, s)
                assert np.abs(back - t).max() <= 0.51 * s.max() + 1e-7  # rounding: half a step
        if not _has_int8(source):
            with pytest.raises(PrismoeError):
                source.read_tile_int8(p, g.active_workers()[0])
        gate = source.read_gate(p)
        if gate is not None:
            w, bias = gate
            assert w.dtype == np.float32 and w.shape == (g.workers, source.d_in)
            assert bias.dtype == np.float32 and bias.shape == (g.workers,)


def test_the_band_and_int8_lists_name_the_right_sources(tmp_path):
    for name in SOURCES:
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        src = SOURCES[name](folder)
        assert _partition(src) == (name in HEADS), name
        assert (_has_int8(src) and not _partition(src)) == (name in INT8), name


def test_bands_order_and_band_gate(head_source):
    source = head_source
    order = source.read_order()
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(source.d_out))
    rows = [source.read_band_tiles(b) for b in range(source.n_bands)]
    assert all(r.dtype == np.float32 and r.shape[1] == source.d_in for r in rows)
    assert sum(len(r) for r in rows) == source.d_out and len(rows[-1]) < source.band_rows  # the short last band
    w, bias = source.read_band_gate()
    assert w.shape == (source.n_bands, source.d_in) and bias.shape == (source.n_bands,)


def test_the_runtime_gives_the_dense_reference_at_full_density(source):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((6, source.d_in)).astype(np.float32))
    ref = x.double() @ torch.from_numpy(dense_matrix(source)).double().T  # [6, d_out]
    run = source if _partition(source) else UniformGate(source)  # ρ = 1 with a uniform gate: the dense matrix
    with open_runtime(run, sparsity=1.0) as rt:
        y = rt(x)
    assert y.dtype == torch.float32 and y.shape == (6, source.d_out)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    if isinstance(source, Recording):
        assert source.reads or source.band_reads  # the runtime read through the wrapper


def test_the_int8_runtime_gives_the_dequantized_reference(int8_source):
    source = int8_source
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((4, source.d_in)).astype(np.float32))
    w = np.zeros((source.d_out, source.d_in))
    for p, (alpha, g) in enumerate(zip(source.alphas, source.grids, strict=True)):
        for j in g.active_workers():
            rows, cols = g.valid_region(j)
            t = dequantize_tile(*source.read_tile_int8(p, j)).astype(np.float64)
            w[rows, cols] += alpha * tile_scale(source.mode, g) * t[: rows.stop - rows.start, : cols.stop - cols.start]
    with open_runtime(UniformGate(source), sparsity=1.0, quant="int8") as rt:
        y = rt(x)
    torch.testing.assert_close(y.double(), x.double() @ torch.from_numpy(w).T, rtol=1e-5, atol=1e-4)
