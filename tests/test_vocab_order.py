"""The vocabulary order: balanced assignment respects capacities; planted groups come back as bands."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prismoe_store.errors import DataError
from prismoe_store.grid import plan_partition
from prismoe_store.head.vocab_order import OrderConfig, balanced_assign, band_sizes, cluster_order


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), bands=st.integers(1, 8), L=st.integers(1, 8), seed=st.integers(0, 1000))
def test_balanced_assign_never_exceeds_a_capacity(n, bands, L, seed):
    rng = np.random.default_rng(seed)
    L = min(L, bands)
    cand = np.stack([rng.permutation(bands)[:L] for _ in range(n)])
    score = -np.sort(-rng.random((n, L)), axis=1)
    caps = band_sizes(n, max(1, -(-n // bands)))
    caps = np.concatenate([caps, np.zeros(bands - len(caps), np.int64)]) if len(caps) < bands else caps[:bands]
    labels = balanced_assign(cand, score, caps)
    placed = labels[labels >= 0]
    assert (np.bincount(placed, minlength=bands) <= caps).all()
    for i in np.flatnonzero(labels >= 0):  # a row only goes to one of its own candidates
        assert labels[i] in cand[i]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 5000), log_a=st.integers(0, 8))
def test_band_sizes_cover_the_rows_like_the_partition_grids(rows, log_a):
    a = min(1 << log_a, 1 << (rows.bit_length() - 1))
    sizes = band_sizes(rows, a)
    assert sizes.sum() == rows and (sizes[:-1] == a).all() and 1 <= sizes[-1] <= a
    grids = plan_partition(3, rows, a)
    assert sum(-(-g.d_out // a) for g in grids) == len(sizes)
    assert sum(g.d_out for g in grids) == rows and len(grids) <= 3


def _planted(groups: int, size: int, d: int, seed: int = 0, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(groups, d))
    w = np.repeat(dirs, size, axis=0) * rng.uniform(0.5, 2.0, size=(groups * size, 1))
    w += noise * rng.normal(size=w.shape)
    perm = rng.permutation(groups * size)
    return w[perm].astype(np.float32), perm // size  # rows, their planted group


def test_cluster_order_recovers_planted_groups_as_bands():
    w, group = _planted(groups=32, size=16, d=24)
    result = cluster_order(lambda a, b: w[a:b], len(w), 24, band_rows=16, config=OrderConfig(iterations=3))
    assert sorted(result.order.tolist()) == list(range(len(w)))
    bands = group[result.order].reshape(32, 16)
    pure = np.mean([len(set(b)) == 1 for b in bands])
    assert pure >= 0.9, pure
    assert result.cohesion > 0.9


@pytest.mark.parametrize("with_scratch", [False, True])
def test_cluster_order_progress_ends_at_its_total(tmp_path, with_scratch):
    """The progress bar's steps are the passes made: it ends at 100 %, not one pass short."""
    w, _ = _planted(groups=8, size=16, d=12)
    calls = []
    cluster_order(lambda a, b: w[a:b], len(w), 12, band_rows=16, config=OrderConfig(iterations=2),
                  progress=lambda done, total: calls.append((done, total)),
                  scratch=str(tmp_path) if with_scratch else None)
    done, total = calls[-1]
    assert done == total == len(w) * (3 + 2 * 2 + with_scratch)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def test_cluster_order_is_reproducible_and_streams_in_blocks(monkeypatch):
    import prismoe_store.head.vocab_order as vo

    w, _ = _planted(groups=16, size=8, d=12, seed=3)
    reads = []

    def read(a, b):
        reads.append(b - a)
        return w[a:b]

    monkeypatch.setattr(vo, "BLOCK_BYTES", 4 * 16 * 40)  # 40 rows per block
    one = cluster_order(read, len(w), 12, band_rows=8, config=OrderConfig(iterations=2, sample_rows=64))
    two = cluster_order(lambda a, b: w[a:b], len(w), 12, band_rows=8, config=OrderConfig(iterations=2, sample_rows=64))
    assert np.array_equal(one.order, two.order)
    assert max(reads) <= 40


def test_non_finite_rows_are_refused():
    w, _ = _planted(groups=4, size=4, d=5)
    w[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN or Inf"):
        cluster_order(lambda a, b: w[a:b], len(w), 5, band_rows=4)


def test_order_config_validates():
    with pytest.raises(DataError):
        OrderConfig(method="random")
    with pytest.raises(DataError):
        OrderConfig(candidates=0)


def test_a_scratch_file_reads_the_matrix_once(monkeypatch, tmp_path):
    """With a scratch folder the rows are read (and mapped) in one pass and every later pass reads
    the scratch file: the same order without a metric, the planted groups still recovered with
    one; NaN/Inf still refused."""
    import prismoe_store.head.vocab_order as vo

    w, group = _planted(groups=16, size=8, d=12, seed=3)
    reads = []

    def read(a, b):
        reads.append((a, b))
        return w[a:b]

    monkeypatch.setattr(vo, "BLOCK_BYTES", 4 * 16 * 40)  # 40 rows per block
    config = OrderConfig(iterations=2, sample_rows=64)
    once = cluster_order(read, len(w), 12, band_rows=8, config=config, scratch=str(tmp_path))
    assert sum(b - a for a, b in reads) == len(w) and max(b - a for a, b in reads) <= 40  # one streamed pass
    every = cluster_order(lambda a, b: w[a:b], len(w), 12, band_rows=8, config=config)
    assert np.array_equal(once.order, every.order) and once.cohesion == pytest.approx(every.cohesion, abs=1e-6)

    metric = np.diag(np.linspace(0.5, 2.0, 12))
    result = cluster_order(lambda a, b: w[a:b], len(w), 12, band_rows=8, metric=metric, scratch=str(tmp_path),
                           config=OrderConfig(iterations=3))
    pure = np.mean([len(set(b)) == 1 for b in group[result.order].reshape(16, 8)])
    assert pure >= 0.9, pure
    w[100, 1] = np.inf
    with pytest.raises(DataError, match="NaN or Inf"):
        cluster_order(lambda a, b: w[a:b], len(w), 12, band_rows=8, scratch=str(tmp_path))
