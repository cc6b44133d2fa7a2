"""routing.route / balance_loss / k_for against float64 numpy references and hand-checked numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prismoe_store.errors import DataError
from prismoe_store.gates.routing import Routing, active_mask, balance_loss, k_for, route, z_loss
from prismoe_store.grid import plan_grid


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one torch thread is many times faster on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# grids with and without padding-only workers (6→10, 33→17, 5→40 have some): (d_in, d_out, workers)
SHAPES = [(8, 8, 4), (6, 10, 8), (7, 3, 8), (33, 17, 16), (5, 40, 32), (64, 64, 16)]


def _numpy_pipe(x: np.ndarray, tiles: np.ndarray, grid, w: np.ndarray) -> np.ndarray:
    """float64 reference ``y_r = Σ_c w[:, r, c] T_rc x_c``, truncated to d_out."""
    a, b = grid.tile_out, grid.tile_in
    xp = np.zeros((x.shape[0], grid.d_in_pad))
    xp[:, : grid.d_in] = x
    y = np.zeros((x.shape[0], grid.d_out_pad))
    for _j, r, c in grid.iter_tiles():
        part = xp[:, c * b:(c + 1) * b] @ tiles[r * a:(r + 1) * a, c * b:(c + 1) * b].T
        y[:, r * a:(r + 1) * a] += w[:, r, c][:, None] * part
    return y[:, : grid.d_out]


@pytest.mark.parametrize("d_in,d_out,workers", SHAPES)
def test_rho1_uniform_joint_equals_dense_product(d_in, d_out, workers):
    g = plan_grid(d_in, d_out, workers)
    rng = np.random.default_rng(1)
    tiles = np.zeros(g.padded_shape)
    tiles[:d_out, :d_in] = rng.normal(size=(d_out, d_in))
    x = rng.normal(size=(9, d_in))
    r = route(torch.from_numpy(x), torch.zeros(g.workers, d_in), torch.zeros(g.workers), grid=g, sparsity=1.0)
    w = r.dense_weights().double().numpy().reshape(-1, g.rows, g.cols)
    assert r.indices.shape == (9, g.active_count)
    np.testing.assert_array_equal(w.reshape(9, -1)[:, active_mask(g).numpy()], 1.0)  # every weight exactly 1
    np.testing.assert_array_equal(w.reshape(9, -1)[:, ~active_mask(g).numpy()], 0.0)
    np.testing.assert_allclose(_numpy_pipe(x, tiles, g, w), x @ tiles[:d_out, :d_in].T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_in,d_out,workers", SHAPES)
def test_rho1_uniform_independent_averages_live_tiles(d_in, d_out, workers):
    g = plan_grid(d_in, d_out, workers)
    x = torch.randn(4, d_in)
    r = route(x, torch.zeros(g.workers, d_in), torch.zeros(g.workers), grid=g, sparsity=1.0, mode="independent")
    w = r.dense_weights().reshape(4, g.rows, g.cols)
    live_rows, live_cols = -(-d_out // g.tile_out), -(-d_in // g.tile_in)
    torch.testing.assert_close(w[:, :live_rows, :live_cols], torch.full((4, live_rows, live_cols), 1 / live_cols))
    assert float(w[:, live_rows:].abs().sum() + w[:, :, live_cols:].abs().sum()) == 0.0


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from(SHAPES), rho=st.floats(0.01, 1.0), seed=st.integers(0, 2**16),
       mode=st.sampled_from(["joint", "independent"]))
def test_topk_selects_exactly_k_active_workers_with_the_highest_scores(shape, rho, seed, mode):
    d_in, d_out, workers = shape
    g = plan_grid(d_in, d_out, workers)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(7, d_in, generator=gen)
    W, b = torch.randn(g.workers, d_in, generator=gen), torch.randn(g.workers, generator=gen)
    r = route(x, W, b, grid=g, sparsity=rho, mode=mode)
    K = k_for(rho, g.active_count)
    assert r.indices.shape == (7, K) and r.weights.shape == (7, K)
    active = set(g.active_workers())
    s = (x.double() @ W.double().T + b.double()).numpy()
    for t in range(7):
        chosen = r.indices[t].tolist()
        assert len(set(chosen)) == K and set(chosen) <= active  # K distinct, never a padding-only worker
        ranked = sorted(active, key=lambda j: -s[t, j])
        assert set(chosen) == set(ranked[:K])  # continuous random scores: no ties
    # weights: joint sums to K per token; independent sums to 1 per band holding a selected worker
    if mode == "joint":
        torch.testing.assert_close(r.weights.sum(1), torch.full((7,), float(K)))
    else:
        dense = r.dense_weights().reshape(7, g.rows, g.cols)
        band_sum = dense.sum(2)
        has = torch.zeros(7, g.rows, dtype=torch.bool)
        has.scatter_(1, r.indices // g.cols, True)
        torch.testing.assert_close(band_sum[has], torch.ones(int(has.sum())))
        assert float(band_sum[~has].abs().sum()) == 0.0


def test_independent_weights_match_numpy_band_softmax():
    g = plan_grid(32, 32, 16)  # 4 × 4
    rng = np.random.default_rng(3)
    x, W, b = rng.normal(size=(5, 32)), rng.normal(size=(16, 32)), rng.normal(size=16)
    r = route(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(b), grid=g, sparsity=0.5,
              mode="independent", temperature=0.7)
    s = x @ W.T + b
    dense = r.dense_weights().double().numpy()
    for t in range(5):
        sel = np.argsort(-s[t])[: k_for(0.5, 16)]
        ref = np.zeros(16)
        for band in range(g.rows):
            members = [j for j in sel if j // g.cols == band]
            if members:
                e = np.exp((s[t, members] - s[t, members].max()) / 0.7)
                ref[members] = e / e.sum()
        np.testing.assert_allclose(dense[t], ref, rtol=1e-5, atol=1e-6)


def test_joint_weights_are_k_times_softmax_with_temperature():
    g = plan_grid(16, 16, 16)
    rng = np.random.default_rng(4)
    x, W = rng.normal(size=(3, 16)), rng.normal(size=(16, 16))
    r = route(torch.from_numpy(x), torch.from_numpy(W), torch.zeros(16), grid=g, sparsity=0.25, temperature=2.0)
    s = x @ W.T
    for t in range(3):
        top = np.sort(s[t])[::-1][:4]
        e = np.exp((top - top.max()) / 2.0)
        np.testing.assert_allclose(r.weights[t].double().numpy(), 4 * e / e.sum(), rtol=1e-5)


def test_balance_loss_hand_checked():
    # 2 tokens, 4 workers, K = 1. Token 0 routes to worker 0, token 1 to worker 0: f = [1, 0, 0, 0].
    s = torch.tensor([[math.log(4.0), 0.0, 0.0, 0.0],  # softmax: [4/7, 1/7, 1/7, 1/7]
                      [math.log(2.0), math.log(2.0), 0.0, 0.0]])  # softmax: [1/3, 1/3, 1/6, 1/6]
    r = Routing(indices=torch.tensor([[0], [0]]), weights=torch.ones(2, 1), scores=s)
    P0 = (4 / 7 + 1 / 3) / 2
    assert float(balance_loss(r)) == pytest.approx(4 * (1.0 * P0) / 1, rel=1e-6)
    # perfectly even routing and uniform probabilities give 1
    r = Routing(indices=torch.tensor([[0, 1], [2, 3]]), weights=torch.ones(2, 2), scores=torch.zeros(2, 4))
    assert float(balance_loss(r)) == pytest.approx(1.0)


def test_balance_loss_counts_padding_workers_in_w():
    g = plan_grid(33, 17, 16)  # 9 of 16 workers touch the matrix
    n = g.active_count
    assert n < g.workers
    x = torch.randn(64, 33)
    r = route(x, torch.zeros(g.workers, 33), torch.zeros(g.workers), grid=g, sparsity=1.0)
    # uniform gate, ρ = 1: f_i = 1 and P_i = 1/n on the active workers → R·C·n·(1/n)/n = W/n
    assert float(balance_loss(r)) == pytest.approx(g.workers / n, rel=1e-6)


def test_z_loss_is_mean_squared_logsumexp_over_active_workers():
    g = plan_grid(5, 40, 32)  # 15 of 32 workers touch the matrix
    x = torch.randn(5, 5, dtype=torch.float64)
    W, b = torch.randn(g.workers, 5), torch.randn(g.workers)
    r = route(x, W, b, grid=g, sparsity=0.5)
    s = (x.float() @ W.T + b)[:, active_mask(g)].double()
    ref = torch.logsumexp(s, 1).pow(2).mean()
    assert float(z_loss(r)) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("rho,n,k", [(0.3, 512, 154), (0.3, 16, 5), (0.1, 16, 2), (0.5, 5, 3), (0.5, 3, 2),
                                     (0.1, 5, 1), (0.01, 7, 1), (1.0, 7, 7), (0.7, 5, 4), (0.25, 16, 4)])
def test_k_for_rounds_half_up_and_clamps(rho, n, k):
    assert k_for(rho, n) == k


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.01])
def test_k_for_rejects_bad_sparsity(rho):
    with pytest.raises(DataError):
        k_for(rho, 10)


def test_route_rejects_bad_mode_and_temperature():
    g = plan_grid(4, 4, 4)
    x, W, b = torch.randn(2, 4), torch.zeros(4, 4), torch.zeros(4)
    with pytest.raises(DataError):
        route(x, W, b, grid=g, sparsity=0.5, mode="soft")
    with pytest.raises(DataError):
        route(x, W, b, grid=g, sparsity=0.5, temperature=0.0)
