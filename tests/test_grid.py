"""The rigid power-of-2 grid planner against a brute-force reference and the seed presets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prismoe_store.errors import GridError
from prismoe_store.grid import GridSpec, is_pow2, next_pow2, plan_grid, plan_pipes

dims = st.integers(min_value=1, max_value=200_000)
small_dims = st.integers(min_value=1, max_value=70)
worker_counts = st.integers(min_value=0, max_value=12).map(lambda k: 1 << k)


def _pow2s_up_to(n: int) -> list[int]:
    return [1 << k for k in range(n.bit_length() + 1)]


def _least_cover(d: int, parts: int) -> int:
    """The smallest power of 2 ``t`` with ``parts * t >= d``, by search (not by formula)."""
    return next(t for t in _pow2s_up_to(2 * d) if parts * t >= d)


def _brute_force_min_area(d_in: int, d_out: int, workers: int, **fixed) -> int:
    """Least padded area over every power-of-2 split ``rows * cols == workers`` and tile shape."""
    best = None
    for rows in _pow2s_up_to(workers):
        if workers % rows or ("rows" in fixed and rows != fixed["rows"]):
            continue
        cols = workers // rows
        if "cols" in fixed and cols != fixed["cols"]:
            continue
        a = fixed.get("tile_out", _least_cover(d_out, rows))
        b = fixed.get("tile_in", _least_cover(d_in, cols))
        if rows * a < d_out or cols * b < d_in:
            continue
        area = rows * a * cols * b
        best = area if best is None else min(best, area)
    return best


# -- planning -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(d_in=dims, d_out=dims, workers=worker_counts, layout=st.sampled_from(["balanced", "wide"]))
def test_plan_covers_with_least_padding(d_in, d_out, workers, layout):
    g = plan_grid(d_in, d_out, workers, layout=layout)
    assert (g.d_in, g.d_out) == (d_in, d_out)
    assert g.workers == g.rows * g.cols == workers
    assert all(is_pow2(v) for v in (g.rows, g.cols, g.tile_out, g.tile_in))
    assert g.d_in_pad >= d_in and g.d_out_pad >= d_out
    assert g.d_in_pad * g.d_out_pad == _brute_force_min_area(d_in, d_out, workers)
    assert 0.0 <= g.padding_fraction < 1.0


@settings(max_examples=150, deadline=None)
@given(d_in=dims, d_out=dims, workers=worker_counts, data=st.data())
def test_overrides_are_honoured_and_still_least_padding(d_in, d_out, workers, data):
    rows = data.draw(st.sampled_from([r for r in _pow2s_up_to(workers) if r <= workers]), label="rows")
    g = plan_grid(d_in, d_out, workers, rows=rows)
    assert g.rows == rows and g.cols == workers // rows
    assert g.d_in_pad * g.d_out_pad == _brute_force_min_area(d_in, d_out, workers, rows=rows)

    tile_in = next_pow2(d_in)  # one input slice would do; the planner must still honour it
    g2 = plan_grid(d_in, d_out, workers, tile_in=tile_in)
    assert g2.tile_in == tile_in
    assert g2.d_in_pad * g2.d_out_pad == _brute_force_min_area(d_in, d_out, workers, tile_in=tile_in)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": 4, "cols": 8},
        {"rows": 8, "cols": 4, "workers": 32},
        {"cols": 2, "workers": 64},
        {"tile_out": 256, "workers": 64},
        {"tile_out": 256, "tile_in": 128, "workers": 128},
    ],
)
def test_explicit_overrides(kwargs):
    g = plan_grid(1000, 3000, **kwargs)
    for k, v in kwargs.items():
        assert getattr(g, k) == v
    assert g.d_in_pad >= 1000 and g.d_out_pad >= 3000


# -- seed presets and odd sizes ----------------------------------------------------------------


def test_seed_presets_4096_to_128256():
    g = plan_grid(4096, 128256)
    assert (g.rows, g.cols, g.tile_out, g.tile_in) == (16, 32, 8192, 128)
    w = plan_grid(4096, 128256, layout="wide")
    assert (w.rows, w.cols, w.tile_out, w.tile_in) == (256, 2, 512, 2048)
    p1, p2, p3 = plan_pipes(4096, 128256)
    assert p1 == p2 == g and p3 == w
    assert g.active_count == 16 * 32  # 128256 > 15 * 8192: every band is live


@pytest.mark.parametrize("d_in, d_out", [(576, 49152), (384, 30522), (3, 7), (7, 3)])
@pytest.mark.parametrize("layout", ["balanced", "wide"])
def test_odd_sizes_plan(d_in, d_out, layout):
    g = plan_grid(d_in, d_out, layout=layout)
    assert g.workers == 512
    assert g.d_in_pad >= d_in and g.d_out_pad >= d_out
    assert g.d_in_pad * g.d_out_pad == _brute_force_min_area(d_in, d_out, 512)
    assert 1 <= g.active_count <= 512


# -- worker <-> (row, col) <-> slice / band ----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(d_in=small_dims, d_out=small_dims, workers=st.integers(0, 6).map(lambda k: 1 << k),
       layout=st.sampled_from(["balanced", "wide"]))
def test_worker_mapping_consistent(d_in, d_out, workers, layout):
    g = plan_grid(d_in, d_out, workers, layout=layout)
    cover = np.zeros(g.padded_shape, dtype=np.int64)
    true_cover = np.zeros((d_out, d_in), dtype=np.int64)
    padding = []
    for j, r, c in g.iter_tiles():
        assert g.row_col(j) == (r, c) and g.worker(r, c) == j == r * g.cols + c
        band, sl = g.tile_region(j)
        assert band == g.output_band(j) == slice(r * g.tile_out, (r + 1) * g.tile_out)
        assert sl == g.input_slice(j) == slice(c * g.tile_in, (c + 1) * g.tile_in)
        cover[band, sl] += 1
        vr, vc = g.valid_region(j)
        true_cover[vr, vc] += 1
        empty = vr.stop <= vr.start or vc.stop <= vc.start
        assert g.is_padding(j) == empty
        padding.append(empty)
    assert (cover == 1).all()  # the tiles partition the padded matrix
    assert (true_cover == 1).all()  # and their valid regions partition the true one
    assert g.active_count == padding.count(False) == len(g.active_workers())
    assert g.active_workers() == [j for j, p in enumerate(padding) if not p]


def test_mapping_rejects_out_of_range():
    g = plan_grid(10, 10, 4)
    for bad in (-1, 4):
        with pytest.raises(GridError):
            g.row_col(bad)
    with pytest.raises(GridError):
        g.worker(g.rows, 0)


@settings(max_examples=100, deadline=None)
@given(d_in=dims, d_out=dims, workers=worker_counts)
def test_dict_round_trip(d_in, d_out, workers):
    g = plan_grid(d_in, d_out, workers)
    assert GridSpec.from_dict(g.to_dict()) == g


# -- impossible requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((0, 10), {}),
        ((10, -3), {}),
        ((10.0, 10), {}),
        ((True, 10), {}),
        ((10, 10, 384), {}),  # workers not a power of 2
        ((10, 10, 0), {}),
        ((10, 10), {"rows": 3}),
        ((10, 10), {"tile_in": 6}),
        ((10, 10, 16), {"rows": 4, "cols": 8}),  # rows*cols != workers
        ((10, 10, 16), {"rows": 32}),  # more rows than workers
        ((100, 100, 4), {"rows": 2, "tile_out": 8}),  # cannot cover d_out
        ((100, 100, 4), {"tile_in": 16, "tile_out": 16}),  # no split covers with these tiles
        ((10, 10), {"layout": "tall"}),
    ],
)
def test_impossible_requests_raise_grid_error(args, kwargs):
    with pytest.raises(GridError):
        plan_grid(*args, **kwargs)


@pytest.mark.parametrize(
    "fields",
    [
        dict(d_in=10, d_out=10, rows=2, cols=2, tile_out=4, tile_in=8),  # rows*tile_out < d_out
        dict(d_in=10, d_out=10, rows=3, cols=4, tile_out=4, tile_in=4),  # rows not a power of 2
        dict(d_in=0, d_out=10, rows=2, cols=2, tile_out=8, tile_in=8),
    ],
)
def test_gridspec_validates(fields):
    with pytest.raises(GridError):
        GridSpec(**fields)


def test_from_dict_errors_are_grid_errors():
    with pytest.raises(GridError):
        GridSpec.from_dict({"d_in": 4})
    with pytest.raises(GridError):
        GridSpec.from_dict({"d_in": "x", "d_out": 1, "rows": 1, "cols": 1, "tile_out": 1, "tile_in": 1})
