"""Pairs store: round trips, chunk layout, atomic appends (interrupted, killed, racing), formats,
and the NaN/Inf screen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prismoe_store.errors import DataError, StoreError, StoreFormatError
from prismoe_store.grid import is_pow2, plan_pipes
from prismoe_store.stores.formats import StoreOptions, format_attrs
from prismoe_store.stores.pairs import (
    NONFINITE_CHOICES,
    PAIRS_FORMAT,
    PairsStore,
    default_col_chunks,
    holdout_mask,
    row_uniform,
    screen_nonfinite,
)
from prismoe_store.stores.weights import WeightsStore

REPO = Path(__file__).resolve().parents[1]


def _mem_url() -> str:
    return f"memory://test-pairs-{uuid.uuid4().hex}"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _tricky(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """float32 values including -0.0, subnormals, extremes and exact zeros (chunks Zarr may skip)."""
    a = rng.standard_normal((n, d)).astype(np.float32)
    special = np.array([-0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, 0.0], np.float32)
    mask = rng.random((n, d)) < 0.2
    a[mask] = rng.choice(special, size=int(mask.sum()))
    return a


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _tagged(start: int, n: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose values name their global row index: x[i] = i + col/1000, z[i] = -i."""
    i = np.arange(start, start + n, dtype=np.float32)[:, None]
    x = i + np.arange(d_in, dtype=np.float32)[None, :] / 1000
    z = np.broadcast_to(-i, (n, d_out)).astype(np.float32)
    return x.astype(np.float32), z


def _check_tagged(store: PairsStore) -> int:
    n = store.rows
    x, z = store.read(0, n)
    expect_x, expect_z = _tagged(0, n, store.d_in, store.d_out)
    assert x.shape == (n, store.d_in) and z.shape == (n, store.d_out)
    np.testing.assert_array_equal(x, expect_x)
    np.testing.assert_array_equal(z, expect_z)
    return n


# -- round trips ---------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(1, 40), d_out=st.integers(1, 40), rows_per_chunk=st.integers(1, 17),
       batches=st.lists(st.integers(0, 23), min_size=1, max_size=5), compressor=st.sampled_from(["none", "zstd"]),
       seed=st.integers(0, 2**16))
def test_append_read_round_trip_bit_exact(d_in, d_out, rows_per_chunk, batches, compressor, seed):
    rng = np.random.default_rng(seed)
    url = _mem_url()
    store = PairsStore.create(url, d_in=d_in, d_out=d_out, rows_per_chunk=rows_per_chunk,
                              options=StoreOptions(compressor=compressor))
    xs, zs = [], []
    for n in batches:
        x, z = _tricky(rng, n, d_in), _tricky(rng, n, d_out)
        assert store.append(x, z) == sum(len(a) for a in xs) + n
        xs.append(x)
        zs.append(z)
    x_all, z_all = np.concatenate(xs), np.concatenate(zs)
    reader = PairsStore.open(url)
    assert reader.rows == len(x_all)
    x, z = reader.read(0, reader.rows + 5)  # clipped to the committed rows
    np.testing.assert_array_equal(_bits(x), _bits(x_all))
    np.testing.assert_array_equal(_bits(z), _bits(z_all))
    # a column range and row blocks read the same bits
    x_cols, z_cols = reader.read(1, reader.rows, cols_x=slice(0, 1 + d_in // 2), cols_z=slice(d_out // 3, None))
    np.testing.assert_array_equal(_bits(x_cols), _bits(x_all[1:, : 1 + d_in // 2]))
    np.testing.assert_array_equal(_bits(z_cols), _bits(z_all[1:, d_out // 3:]))
    got = list(reader.iter_rows(5))
    assert [o for o, _, _ in got] == list(range(0, len(x_all), 5))
    if got:
        np.testing.assert_array_equal(_bits(np.concatenate([b for _, b, _ in got])), _bits(x_all))
    dx, dz = reader.dask(row_chunk=7)
    assert dx.shape == x_all.shape and dz.shape == z_all.shape
    np.testing.assert_array_equal(_bits(np.asarray(dz.compute())), _bits(z_all))


def test_local_store_round_trip_and_provenance(tmp_path):
    url = tmp_path / "pairs"
    store = PairsStore.create(url, d_in=5, d_out=3, rows_per_chunk=4, provenance={"upper": "a"})
    x, z = _tagged(0, 10, 5, 3)
    store.append(x[:6], z[:6], provenance={"texts": ["t1"]})
    store.append(x[6:], z[6:])
    store.set_provenance(layer=-1)
    reader = PairsStore.open(str(url))
    assert _check_tagged(reader) == 10
    assert reader.provenance == {"upper": "a", "texts": ["t1"], "layer": -1}
    with pytest.raises(StoreError, match="already exists"):
        PairsStore.create(url, d_in=5, d_out=3)
    assert PairsStore.create(url, d_in=2, d_out=2, overwrite=True).rows == 0


# -- chunk layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("d_in,d_out", [(4096, 128256), (576, 49152), (384, 30522), (256, 1024), (64, 256), (7, 3)])
def test_chunks_are_row_blocks_by_grid_aligned_columns(d_in, d_out):
    store = PairsStore.create(_mem_url(), d_in=d_in, d_out=d_out, rows_per_chunk=1000)
    cin, cout = default_col_chunks(d_in, d_out)
    assert store.x.chunks == (1000, cin) and store.z.chunks == (1000, cout)
    for width, chunk in ((d_in, cin), (d_out, cout)):
        assert chunk == width or is_pow2(chunk)
    for g in plan_pipes(d_in, d_out):
        for chunk, tile, width in ((cin, g.tile_in, d_in), (cout, g.tile_out, d_out)):
            # every input slice / output band is a whole number of chunks, or lies inside one chunk
            assert chunk == width or chunk % tile == 0 or tile % chunk == 0
    big = plan_pipes(4096, 128256)
    if (d_in, d_out) == (4096, 128256):  # the seed preset: a chunk is exactly one slice/band of pipe 1
        assert (cin, cout) == (big[0].tile_in, big[2].tile_out)


def test_explicit_column_chunks():
    store = PairsStore.create(_mem_url(), d_in=100, d_out=60, rows_per_chunk=8, col_chunks=(32, 16))
    assert store.x.chunks == (8, 32) and store.z.chunks == (8, 16)


# -- bad input -----------------------------------------------------------------------------------


def test_mismatched_widths_and_rows_are_data_errors():
    store = PairsStore.create(_mem_url(), d_in=6, d_out=4)
    with pytest.raises(DataError, match="width mismatch: store holds 6→4, got 7→4"):
        store.append(np.zeros((3, 7)), np.zeros((3, 4)))
    with pytest.raises(DataError, match="width mismatch"):
        store.append(np.zeros((3, 6)), np.zeros((3, 5)))
    with pytest.raises(DataError, match="append needs"):
        store.append(np.zeros((3, 6)), np.zeros((2, 4)))
    with pytest.raises(DataError, match="append needs"):
        store.append(np.zeros(6), np.zeros(4))
    assert store.rows == 0 and store.x.shape[0] == 0
    for bad in ({"d_in": 0, "d_out": 3}, {"d_in": 3, "d_out": 2.5}, {"d_in": 3, "d_out": 3, "rows_per_chunk": 0}):
        with pytest.raises(DataError):
            PairsStore.create(_mem_url(), **bad)


def test_format_and_version_are_checked(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        PairsStore.open(tmp_path / "nothing")
    url = tmp_path / "pairs"
    PairsStore.create(url, d_in=3, d_out=2)
    group = zarr.open_group(str(url), mode="r+")
    group.attrs.update(format_attrs(PAIRS_FORMAT, 99))
    with pytest.raises(StoreFormatError, match="pairs format version 99, this library reads version 1"):
        PairsStore.open(url)
    WeightsStore.create(tmp_path / "weights")
    with pytest.raises(StoreFormatError, match="is a weights store, not a pairs store"):
        PairsStore.open(tmp_path / "weights")
    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(StoreFormatError, match="not a prismoe store"):
        PairsStore.open(tmp_path / "plain")


# -- atomic appends ------------------------------------------------------------------------------


def test_interrupted_append_is_invisible_and_a_re_append_works(tmp_path, monkeypatch):
    url = str(tmp_path / "pairs")
    store = PairsStore.create(url, d_in=10, d_out=7, rows_per_chunk=16)
    x, z = _tagged(0, 40, 10, 7)
    store.append(x[:25], z[:25])  # the last chunk is partly filled: the next append rewrites it
    original = zarr.Array.__setitem__

    def half_then_fail(self, key, value):
        if self.basename == "z":  # x is written whole, then z half-way, then the "crash"
            rows = key if isinstance(key, slice) else key[0]
            original(self, slice(rows.start, rows.start + len(value) // 2), value[: len(value) // 2])
            raise OSError("disk vanished")
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", half_then_fail)
    with pytest.raises(OSError):
        store.append(np.full((15, 10), 999, np.float32), np.full((15, 7), 999, np.float32))
    monkeypatch.setattr(zarr.Array, "__setitem__", original)

    reader = PairsStore.open(url)
    assert reader.rows == 25 and reader.x.shape[0] == 40  # the arrays grew; the commit did not happen
    assert _check_tagged(reader) == 25
    assert reader.dask()[0].shape == (25, 10)
    assert store.append(x[25:], z[25:]) == 40  # same writer, after the failure
    assert _check_tagged(PairsStore.open(url)) == 40


_KILL_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from prismoe_store.stores.pairs import PairsStore
    sys.path.insert(0, sys.argv[2])
    from test_pairs import _tagged
    store = PairsStore.open(sys.argv[1], "r+")
    first = True
    while True:
        n = store.rows
        x, z = _tagged(n, 3000, store.d_in, store.d_out)
        store.append(x, z)
        if first:
            print("appending", flush=True)
            first = False
""")


def test_killed_appender_leaves_a_consistent_store(tmp_path):
    url = str(tmp_path / "pairs")
    PairsStore.create(url, d_in=64, d_out=256, rows_per_chunk=1000, options=StoreOptions(compressor="zstd"))
    rng = np.random.default_rng(0)
    seen = set()
    for _attempt in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, url, str(REPO / "tests")],
                                stdout=subprocess.PIPE, env=_env(), text=True)
        assert proc.stdout.readline().strip() == "appending"
        time.sleep(float(rng.uniform(0.05, 0.4)))  # somewhere inside some later append
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader = PairsStore.open(url)
        n = _check_tagged(reader)  # committed rows are all intact, x and z alike
        assert reader.x.shape[0] >= n and reader.z.shape[0] >= n
        seen.add(n)
    store = PairsStore.open(url, "r+")  # the dead writer's lock is gone: appending goes on
    n = store.rows
    x, z = _tagged(n, 10, 64, 256)
    assert store.append(x, z) == n + 10
    _check_tagged(PairsStore.open(url))


def test_readers_never_see_a_torn_append(tmp_path):
    url = str(tmp_path / "pairs")
    writer = PairsStore.create(url, d_in=12, d_out=20, rows_per_chunk=64)
    reader = PairsStore.open(url)  # one object, opened before any append: must still see new rows
    done = threading.Event()
    seen = []

    def write():
        for k in range(30):
            x, z = _tagged(writer.rows, 37 + k % 5, 12, 20)
            writer.append(x, z)
        done.set()

    t = threading.Thread(target=write)
    t.start()
    while not done.is_set():
        seen.append(_check_tagged(reader))
    t.join()
    seen.append(_check_tagged(reader))
    assert seen == sorted(seen) and seen[-1] == writer.rows
    assert len(set(seen)) > 3  # the reader did watch the store grow


def _tag_rows(writer: int, batch: int, n: int, d_in: int, d_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that name (writer, batch, row); z is a function of x so mixed-up pairs are caught."""
    x = np.zeros((n, d_in), np.float32)
    x[:, 0], x[:, 1], x[:, 2] = writer, batch, np.arange(n)
    x[:, 3:] = x[:, :1] + x[:, 1:2] / 100
    key = writer * 10000 + batch * 100 + np.arange(n)
    z = np.repeat(key[:, None].astype(np.float32), d_out, axis=1) + np.arange(d_out, dtype=np.float32)
    return x, z


def _check_racers(url, expected: dict[tuple[int, int], int], d_out: int) -> None:
    store = PairsStore.open(url)
    x, z = store.read(0, store.rows)
    assert store.rows == sum(expected.values())
    key = x[:, 0] * 10000 + x[:, 1] * 100 + x[:, 2]
    np.testing.assert_array_equal(z, key[:, None] + np.arange(d_out, dtype=np.float32))
    np.testing.assert_array_equal(x[:, 3], x[:, 0] + x[:, 1] / 100)
    got = sorted(map(tuple, x[:, :3].astype(int).tolist()))
    want = sorted((w, b, j) for (w, b), n in expected.items() for j in range(n))
    assert got == want  # every row of every batch once, nothing lost or doubled
    # each batch is contiguous: a racing append never interleaves with another
    for w, b in expected:
        where = np.flatnonzero((x[:, 0] == w) & (x[:, 1] == b))
        assert (np.diff(where) == 1).all()


@pytest.mark.parametrize("where", ["local", "memory"])
def test_racing_appenders_in_threads(tmp_path, where):
    url = str(tmp_path / "pairs") if where == "local" else _mem_url()
    PairsStore.create(url, d_in=6, d_out=9, rows_per_chunk=16)
    sizes = {(w, b): 3 + (w * 7 + b * 3) % 11 for w in range(4) for b in range(8)}
    errors = []

    def run(w):
        try:
            store = PairsStore.open(url, "r+")  # each thread its own object, as separate jobs would have
            for b in range(8):
                store.append(*_tag_rows(w, b, sizes[w, b], 6, 9))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _check_racers(url, sizes, 9)


_RACER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    from prismoe_store.stores.pairs import PairsStore
    from test_pairs import _tag_rows
    w, url = int(sys.argv[1]), sys.argv[2]
    store = PairsStore.open(url, "r+")
    for b in range(15):
        store.append(*_tag_rows(w, b, 50 + (w * 7 + b * 3) % 40, store.d_in, store.d_out))
""")


def test_racing_appenders_in_two_processes(tmp_path):
    url = str(tmp_path / "pairs")
    PairsStore.create(url, d_in=8, d_out=40, rows_per_chunk=64)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(w), url, str(REPO / "tests")], env=_env())
             for w in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    _check_racers(url, {(w, b): 50 + (w * 7 + b * 3) % 40 for w in (1, 2) for b in range(15)}, 40)


# -- NaN / Inf -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 30), seed=st.integers(0, 2**16), share=st.floats(0, 0.5))
def test_screen_nonfinite(n, seed, share):
    rng = np.random.default_rng(seed)
    x, z = rng.standard_normal((n, 5)), rng.standard_normal((n, 3)).astype(np.float32)
    x[rng.random(x.shape) < share / 4] = np.nan
    z[rng.random(z.shape) < share / 4] = np.inf
    x[rng.random(x.shape) < share / 8] = -1e300  # finite in float64, -inf in the store's float32
    x_in, z_in = x.copy(), z.copy()
    with np.errstate(over="ignore"):
        bad = ~(np.isfinite(x.astype(np.float32)).all(1) & np.isfinite(z).all(1))
    count = int(bad.sum())

    if count:
        with pytest.raises(DataError, match=f"^{count} of {n} pairs from f.txt hold NaN/Inf"):
            screen_nonfinite(x, z, "error", where="f.txt")
    else:
        xs, zs, c = screen_nonfinite(x, z, "error")
        assert c == 0 and xs.dtype == np.float32 and (xs == x.astype(np.float32)).all() and (zs == z).all()
    xs, zs, c = screen_nonfinite(x, z, "drop")
    assert c == count and xs.dtype == zs.dtype == np.float32
    np.testing.assert_array_equal(xs, x[~bad].astype(np.float32))
    np.testing.assert_array_equal(zs, z[~bad])
    xs, zs, c = screen_nonfinite(x, z, "zero")
    assert c == count and xs.shape == (n, 5) and zs.shape == (n, 3)
    assert (xs[bad] == 0).all() and (zs[bad] == 0).all()
    np.testing.assert_array_equal(xs[~bad], x[~bad].astype(np.float32))
    np.testing.assert_array_equal(zs[~bad], z[~bad])
    np.testing.assert_array_equal(x, x_in)  # the caller's arrays are untouched
    np.testing.assert_array_equal(z, z_in)


def test_screen_nonfinite_rejects_unknown_choices_and_shapes():
    assert NONFINITE_CHOICES == ("error", "drop", "zero")
    with pytest.raises(DataError, match="on_nonfinite must be one of"):
        screen_nonfinite(np.zeros((1, 2)), np.zeros((1, 2)), "keep")
    with pytest.raises(DataError, match="same n"):
        screen_nonfinite(np.zeros((2, 2)), np.zeros((1, 2)))


def test_screened_rows_append_cleanly():
    store = PairsStore.create(_mem_url(), d_in=2, d_out=1)
    x = np.array([[1, 2], [np.nan, 0], [3, 4]], np.float32)
    z = np.array([[1], [2], [np.inf]], np.float32)
    xs, zs, bad = screen_nonfinite(x, z, "drop")
    assert bad == 2 and store.append(xs, zs) == 1
    assert np.isfinite(store.read(0, 1)[0]).all()


# -- row splits ----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), start=st.integers(0, 200_000), n=st.integers(0, 70_000))
def test_row_splits_do_not_depend_on_chunking(seed, start, n):
    whole = row_uniform(seed, start, start + n)
    cut = start + n // 3
    np.testing.assert_array_equal(whole, np.concatenate([row_uniform(seed, start, cut),
                                                         row_uniform(seed, cut, start + n)]))
    np.testing.assert_array_equal(holdout_mask(seed, start, start + n, 0.2), whole < 0.2)


def _collected(path, layer: int, rows: int = 400, d: int = 8, seed: int = 0) -> PairsStore:
    """A pairs store as `prismoe collect` records it: x from model layer ``layer`` of 30."""
    rng = np.random.default_rng(seed)
    store = PairsStore.create(str(path), d_in=d, d_out=d, provenance={
        "kind": "collected", "settings": {"layer": layer, "upper_model": {"num_hidden_layers": 30}}})
    x = rng.standard_normal((rows, d), dtype=np.float32)
    store.append(x, x @ rng.standard_normal((d, d), dtype=np.float32))
    return store


def test_infer_notes_rows_from_another_layer_than_the_fit(tmp_path):
    """A fitted adapter expects rows from the layer of its training pairs: `infer` says so on stderr
    for rows collected from another layer (same width, so nothing else would), and says nothing for
    rows of the same layer or a .npy that does not say."""
    from click.testing import CliRunner

    from cli.main import main
    from prismoe_store.fit import FitConfig, fit
    from prismoe_store.stores.pairs import collected_layer, fitted_input_note

    train, other = _collected(tmp_path / "l12.zarr", 12), _collected(tmp_path / "l30.zarr", 30, seed=1)
    assert collected_layer(train) == (12, 30) and collected_layer(str(tmp_path / "missing.zarr")) is None
    fit(train, str(tmp_path / "a.zarr"), FitConfig(workers=4))
    np.save(tmp_path / "x.npy", other.read_x(0, 10))
    for rows, noted in (("l30.zarr", True), ("l12.zarr", False), ("x.npy", False)):
        res = CliRunner().invoke(main, ["infer", str(tmp_path / "a.zarr"), "--input", str(tmp_path / rows),
                                        "-o", str(tmp_path / "y.npy"), "-q"])
        assert res.exit_code == 0, res.output
        assert ("holds hidden states of layer 30 of 30; the adapter was fitted on layer 12's" in res.stderr) == noted
    assert fitted_input_note(other, train) is not None and fitted_input_note(train, train) is None
