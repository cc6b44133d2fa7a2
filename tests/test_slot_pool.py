"""The device slot pool and the host tier: LRU order, counters against a reference LRU, the byte
budget, pinned slots inside a call, INT8 slots, shared arenas, prefetch, CUDA staging."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prismoe_store.errors import CacheError
from prismoe_store.runtime.host_tier import HostTier, hot_tiles
from prismoe_store.runtime.slot_pool import SlotPool, slot_bytes

A, D = 2, 3  # tile shape: 24 float32 bytes a slot


def _tile(t: int) -> np.ndarray:
    return np.full((A, D), float(t), np.float32) + np.arange(A * D, dtype=np.float32).reshape(A, D) / 8


def _pool(slots: int, log: list | None = None, **kw) -> SlotPool:
    def load(t):
        if log is not None:
            log.append(t)
        return (_tile(t),)
    return SlotPool(n_tiles=10, tile_shape=(A, D), budget_bytes=slots * 24, load=load, **kw)


def _call(pool: SlotPool, tiles) -> torch.Tensor:
    """One call: acquire, read the tiles back (``[n, a, d]``), release."""
    got = pool.weights(pool.acquire(np.asarray(tiles))).transpose(1, 2)
    pool.release()
    return got


def test_lru_order_hits_misses_evictions():
    pool = _pool(3)
    for t in (0, 1, 2):
        _call(pool, [t])
    _call(pool, [0])  # 0 becomes most recent: 1 is now the oldest
    _call(pool, [3])  # evicts 1
    assert sorted(np.flatnonzero(pool.slot_of >= 0).tolist()) == [0, 2, 3]
    s = pool.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes_loaded) == (1, 4, 1, 96)
    assert s.peak_bytes == 72 == s.used_bytes and s.tiles == 3 and s.slots == 3
    assert s.hit_rate == pytest.approx(1 / 5)


def test_tile_values_come_back_and_short_tiles_count_true_bytes():
    pool = SlotPool(n_tiles=3, tile_shape=(A, D), budget_bytes=3 * 24, tile_rows=np.array([2, 2, 1]),
                    load=lambda t: (_tile(t)[: 1 if t == 2 else 2],))
    got = _call(pool, [2, 0])
    assert torch.equal(got[0, 0], torch.from_numpy(_tile(2)[0])) and torch.equal(got[0, 1], torch.zeros(D))
    assert torch.equal(got[1], torch.from_numpy(_tile(0)))
    assert pool.stats().bytes_loaded == 24 + 12


def test_too_small_a_budget_is_a_clear_error():
    with pytest.raises(CacheError, match="smaller than one tile"):
        _pool(0)
    with pytest.raises(CacheError, match="smaller than one tile"):
        SlotPool(n_tiles=2, tile_shape=(A, D), budget_bytes=23, load=lambda t: (_tile(t),))


def test_an_eviction_inside_a_call_never_overwrites_a_pinned_slot():
    pool = _pool(2)
    first = pool.acquire(np.array([0, 1]))  # both slots pinned by this call
    with pytest.raises(CacheError, match="do not fit"):
        pool.acquire(np.array([2]))
    assert torch.equal(pool.weights(first)[1].T, torch.from_numpy(_tile(1)))  # untouched
    pool.release()
    assert torch.equal(_call(pool, [2])[0], torch.from_numpy(_tile(2)))  # after the call, 0 (LRU) may go
    assert pool.resident(np.array([0, 1, 2])).tolist() == [False, True, True]


def test_within_a_call_a_second_group_takes_only_unpinned_slots():
    pool = _pool(3)
    _call(pool, [0, 1, 2])
    slots_a = pool.acquire(np.array([2]))  # pinned: hit
    slots_b = pool.acquire(np.array([5, 6]))  # must evict 0 and 1, never 2
    assert int(slots_a[0]) not in slots_b.tolist()
    assert torch.equal(pool.weights(slots_a)[0].T, torch.from_numpy(_tile(2)))
    assert torch.equal(pool.weights(slots_b)[1].T, torch.from_numpy(_tile(6)))
    pool.release()


@pytest.mark.parametrize("quant", [None, "int8"])
def test_products_are_each_tile_times_its_own_input(quant):
    """The fused products against a float64 reference, with repeated and short tiles."""
    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((5, 4, 6)).astype(np.float32)
    q = np.clip(np.round(tiles * 20), -127, 127).astype(np.int8)
    scales = rng.uniform(0.5, 2, (5, 4)).astype(np.float32)
    load = (lambda t: (tiles[t][: 3 if t == 4 else 4],)) if quant is None else (lambda t: (q[t], scales[t]))
    pool = SlotPool(n_tiles=5, tile_shape=(4, 6), budget_bytes=10 ** 4, quant=quant, load=load,
                    tile_rows=np.array([4, 4, 4, 4, 3 if quant is None else 4]))
    ids = np.array([4, 1, 3])
    slots = pool.acquire(ids)
    which = torch.tensor([0, 1, 1, 2, 0])  # tiles used more than once, in any order
    x = torch.from_numpy(rng.standard_normal((5, 6)).astype(np.float32))
    y = pool.products(slots[which], x).double()
    dense = tiles.astype(np.float64) if quant is None else q.astype(np.float64) * scales[..., None]
    if quant is None:
        dense[4, 3] = 0.0  # the short tile's missing row reads as zero
    ref = np.einsum("nad,nd->na", dense[ids[which.numpy()]], x.double().numpy())
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_int8_slots_dequantize_on_read():
    q = np.array([[1, -2, 3], [4, 5, -6]], np.int8)
    scales = np.array([0.5, 2.0], np.float32)
    pool = SlotPool(n_tiles=1, tile_shape=(A, D), budget_bytes=slot_bytes((A, D), "int8"), quant="int8",
                    load=lambda t: (q, scales))
    got = _call(pool, [0])[0]
    assert torch.equal(got, torch.from_numpy(q.astype(np.float32) * scales[:, None]))
    assert pool.stats().bytes_loaded == 6 + 8


def test_pools_sharing_an_arena_take_turns():
    arena = torch.empty(2 * 24, dtype=torch.uint8)
    p1 = SlotPool(n_tiles=4, tile_shape=(A, D), budget_bytes=0, arena=arena, load=lambda t: (_tile(t),))
    p2 = SlotPool(n_tiles=4, tile_shape=(1, 2 * D), budget_bytes=0, arena=arena,
                  load=lambda t: (np.full((1, 2 * D), -t, np.float32),))
    assert p1.slots == 2 and p2.slots == 2
    _call(p1, [1, 2])
    p1.clear()  # the other pool is about to overwrite the arena
    assert torch.equal(_call(p2, [3])[0], torch.full((1, 2 * D), -3.0))
    assert torch.equal(_call(p1, [1])[0], torch.from_numpy(_tile(1)))  # reloaded, not stale


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 6), calls=st.lists(st.sets(st.integers(0, 9), min_size=1, max_size=6),
                                               min_size=1, max_size=25))
def test_counters_match_a_reference_lru_and_values_are_right(slots, calls):
    """Random calls of up to ``slots`` distinct tiles: values always right, resident bytes within the
    budget, and hits/misses/evictions equal a plain reference LRU (tiles of a call touched in order)."""
    pool = _pool(slots)
    lru, hits, misses, evictions = OrderedDict(), 0, 0, 0
    for call in calls:
        tiles = sorted(call)[:slots]
        got = _call(pool, tiles)
        for i, t in enumerate(tiles):
            assert torch.equal(got[i], torch.from_numpy(_tile(t)))
        assert pool.used_bytes <= slots * 24
        # reference: the call's resident tiles stay; each missing tile evicts the least recently
        # used tile outside the call; then the call's tiles are touched in list order
        hits += sum(t in lru for t in tiles)
        for t in tiles:
            if t not in lru:
                while len(lru) >= slots:
                    victim = next(k for k in lru if k not in tiles)
                    del lru[victim]
                    evictions += 1
                lru[t] = True
                misses += 1
        for t in tiles:
            lru.move_to_end(t)
    s = pool.stats()
    assert (s.hits, s.misses, s.evictions) == (hits, misses, evictions)
    assert sorted(np.flatnonzero(pool.slot_of >= 0).tolist()) == sorted(lru)


def test_host_tier_serves_repeats_and_prefetch_hits_count():
    reads = []
    tier = HostTier(3 * 24, lambda t: (reads.append(t) or _tile(t),))
    for t in (0, 1, 0):
        tier.get(t)
    assert reads == [0, 1]
    tier.prefetch([2, 2, 0])
    tier.wait()
    assert reads == [0, 1, 2]
    assert np.array_equal(tier.get(2)[0], _tile(2))
    s = tier.stats()
    assert (s["hits"], s["misses"], s["prefetched"], s["prefetch_hits"]) == (2, 2, 1, 1)
    assert s["prefetch_hit_rate"] == 1.0
    tier.get(3)  # over budget: the least recently used (1) goes
    assert 1 not in tier and s["bytes"] <= 72
    tier.close()


def test_host_tier_off_reads_the_store_each_time():
    reads = []
    tier = HostTier(0, lambda t: (reads.append(t) or _tile(t),))
    tier.get(1), tier.get(1)
    tier.prefetch([1])
    assert reads == [1, 1] and tier.stats()["prefetched"] == 0


def test_hot_tiles_skip_resident_and_cold():
    heat = np.array([0.0, 4.0, 9.0, 1.0])
    assert hot_tiles(heat, np.array([False, False, True, False]), 5).tolist() == [1, 3]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pool_matches_the_host_tiles_and_allocates_its_slots_once():
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    a, d = 256, 1024  # 1 MiB tiles
    tiles = np.random.default_rng(0).standard_normal((12, a, d)).astype(np.float32)
    pool = SlotPool(n_tiles=12, tile_shape=(a, d), budget_bytes=3 * 4 * a * d, device="cuda",
                    load=lambda t: (tiles[t],))
    assert torch.cuda.memory_allocated() - base == 3 * 4 * a * d
    for i in range(20):
        want = [i % 12, (i + 5) % 12]
        got = pool.weights(pool.acquire(np.array(want)))
        x = torch.randn(2, d, device="cuda")
        y = pool.products(pool.acquire(np.array(want)), x)
        pool.release()
        torch.testing.assert_close(got.transpose(1, 2).cpu(), torch.from_numpy(tiles[want]))
        torch.testing.assert_close(y.cpu(), torch.einsum("nad,nd->na", torch.from_numpy(tiles[want]), x.cpu()),
                                   rtol=1e-4, atol=1e-3)
    assert pool.stats().peak_bytes <= 3 * 4 * a * d
    pool.close()


def test_heat_ranked_eviction_keeps_the_often_selected_tile():
    heat = np.zeros(10)
    pool = _pool(2, heat=heat)
    _call(pool, [0])
    heat[0] = 5.0  # tile 0 is selected often, tile 1 once
    _call(pool, [1])
    _call(pool, [1])
    _call(pool, [2])  # LRU would evict 0 (least recent); heat evicts 1 (colder)
    assert pool.resident(np.array([0, 1, 2])).tolist() == [True, False, True]
    lru = _pool(2)
    for t in (0, 1, 1, 2):
        _call(lru, [t])
    assert lru.resident(np.array([0, 1, 2])).tolist() == [False, True, True]
