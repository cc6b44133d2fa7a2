"""The LRU tile cache: LRU order, counters, the byte budget, prefetch, eviction, CUDA accounting."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prismoe_store.cache import TileCache
from prismoe_store.errors import CacheError


def _loader(n_floats, value=0.0, log=None, key=None):
    def load():
        if log is not None:
            log.append(key)
        return (np.full(n_floats, value, np.float32),)
    return load


def _touch(cache, key, n_floats=4, log=None):
    with cache.use(key, _loader(n_floats, float(hash(key) % 7), log, key)) as (t,):
        return t.clone()


def test_lru_order_hits_misses_evictions():
    c = TileCache(3 * 16, prefetch=False)  # room for three 16-byte tiles
    for k in "abc":
        _touch(c, k)
    _touch(c, "a")  # a becomes most recent: b is now the oldest
    _touch(c, "d")  # evicts b
    assert c.keys() == ["c", "a", "d"]
    s = c.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes_loaded) == (1, 4, 1, 64)
    assert s.peak_bytes == 48 == s.used_bytes and s.tiles == 3
    assert s.hit_rate == pytest.approx(1 / 5)


def test_tile_values_come_back_from_the_loader():
    c = TileCache(1024, prefetch=False)
    with c.use("k", lambda: (np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.int8))) as (t, s):
        assert t.tolist() == [[0, 1, 2], [3, 4, 5]] and s.dtype == torch.int8
    assert c.used_bytes == 24 + 2


def test_tile_larger_than_budget_is_a_clear_error():
    c = TileCache(15, prefetch=False)
    with pytest.raises(CacheError, match="does not fit the cache budget"):
        _touch(c, "big")
    with pytest.raises(CacheError):
        TileCache(0)


def test_a_tile_in_use_is_never_evicted():
    c = TileCache(16, prefetch=False)
    with c.use("a", _loader(4)):
        with pytest.raises(CacheError, match="in use"):
            _touch(c, "b")
    _touch(c, "b")  # once released, "a" may go
    assert c.keys() == ["b"]


def test_prefetched_tile_counts_once_as_a_miss():
    log = []
    c = TileCache(64, prefetch=True)
    c.prefetch("p", _loader(4, log=log, key="p"))
    c.prefetch("p", _loader(4, log=log, key="p"))  # already pending: no second read
    _touch(c, "p", log=log)
    _touch(c, "p", log=log)
    assert log == ["p"]
    s = c.stats()
    assert (s.hits, s.misses) == (1, 1)
    c.close()


def test_evict_predicate_and_reset():
    c = TileCache(1000, prefetch=False)
    for k in [(0, 1), (0, 2), (1, 1)]:
        _touch(c, k)
    assert c.evict(lambda key: key[0] == 0) == 2
    assert c.keys() == [(1, 1)] and c.used_bytes == 16
    c.reset_stats()
    s = c.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes_loaded, s.peak_bytes) == (0, 0, 0, 0, 16)


@settings(max_examples=60, deadline=None)
@given(budget=st.integers(40, 400),
       requests=st.lists(st.tuples(st.integers(0, 9), st.integers(1, 10)), min_size=1, max_size=60))
def test_budget_is_never_exceeded_and_counters_match_a_reference_lru(budget, requests):
    """Random keys of random sizes (≤ 40 bytes): resident bytes stay within the budget at every
    step, and every counter equals a plain reference LRU's."""
    c = TileCache(budget, prefetch=False)
    sizes = {}
    for key, n in requests:
        n = sizes.setdefault(key, n)  # a key always has the same size
        _touch(c, key, n)
        assert c.used_bytes <= budget
        assert c.used_bytes == sum(4 * sizes[k] for k in c.keys())
    s = c.stats()
    assert s.peak_bytes <= budget
    assert (s.hits, s.misses, s.evictions, s.bytes_loaded, s.peak_bytes) == _reference_lru(
        [(k, 4 * sizes[k]) for k, _ in requests], budget)
    assert c.keys() == _reference_lru([(k, 4 * sizes[k]) for k, _ in requests], budget, keys=True)


def _reference_lru(requests, budget, keys=False):
    from collections import OrderedDict
    lru, used, hits, misses, evictions, loaded, peak = OrderedDict(), 0, 0, 0, 0, 0, 0
    for key, n in requests:
        if key in lru:
            lru.move_to_end(key)
            hits += 1
            continue
        while used + n > budget:
            used -= lru.popitem(last=False)[1]
            evictions += 1
        lru[key] = n
        used += n
        misses += 1
        loaded += n
        peak = max(peak, used)
    return list(lru) if keys else (hits, misses, evictions, loaded, peak)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_stays_within_budget_on_the_device():
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tile = 256 * 1024  # floats: 1 MiB a tile
    c = TileCache(3 * 4 * tile, device="cuda", prefetch=True)
    for i in range(20):
        key = i % 5
        c.prefetch((key + 1) % 5, _loader(tile, float(key + 1)))
        with c.use(key, _loader(tile, float(key))) as (t,):
            assert t.is_cuda
            assert float(t[0]) == float(key)
    torch.cuda.synchronize()
    assert c.stats().peak_bytes <= c.budget_bytes
    assert torch.cuda.max_memory_allocated() - base <= c.budget_bytes
    c.close()
