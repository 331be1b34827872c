"""Decoded-tile LRU: byte budget, recency order, read-only entries, per-slide discard."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gpfm_engine.slide.tile_cache import TileCache


def tile(value: int, nbytes: int = 100) -> np.ndarray:
    return np.full(nbytes, value, np.uint8)


def test_lru_eviction_by_bytes():
    cache = TileCache(300)
    for k in range(3):
        cache.put(("s", 0, k), tile(k))
    assert cache.get(("s", 0, 0)) is not None  # 0 becomes most recent
    cache.put(("s", 0, 3), tile(3))  # evicts 1, the least recently used
    assert cache.get(("s", 0, 1)) is None
    assert [cache.get(("s", 0, k)) is not None for k in (0, 2, 3)] == [True, True, True]
    assert cache.nbytes == 300 and len(cache) == 3
    cache.put(("s", 0, 4), tile(4, 250))  # a big one pushes out more than one entry
    assert cache.nbytes <= 300 and cache.get(("s", 0, 4)) is not None


def test_entries_are_read_only_and_oversize_not_cached():
    cache = TileCache(150)
    stored = cache.put("k", tile(7))
    with pytest.raises(ValueError):
        stored[0] = 1
    cache.put("big", tile(1, 200))
    assert cache.get("big") is None and cache.nbytes == 100


def test_disabled_and_discard_and_counters():
    off = TileCache(0)
    off.put("k", tile(1))
    assert off.get("k") is None and off.misses == 1
    cache = TileCache(1000)
    a, b = object(), object()
    cache.put((a, 0, 0), tile(1))
    cache.put((b, 0, 0), tile(2))
    cache.discard(a)
    assert cache.get((a, 0, 0)) is None and cache.get((b, 0, 0)) is not None
    assert (cache.hits, cache.misses) == (1, 1)
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError):
        TileCache(-1)


def test_concurrent_use_keeps_the_budget():
    cache = TileCache(50 * 100)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(500):
            key = int(rng.integers(0, 200))
            if cache.get(key) is None:
                cache.put(key, tile(key % 256))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(work, range(8)))
    assert cache.nbytes <= 5000 and cache.nbytes == 100 * len(cache)


def test_batch_get_and_put_behave_like_single_calls():
    one, batch = TileCache(300), TileCache(300)
    pairs = [(("s", 0, k), tile(k)) for k in range(5)]
    for key, value in pairs:
        one.put(key, value.copy())
    stored = batch.put_many((key, value.copy()) for key, value in pairs)
    assert all(not v.flags.writeable for v in stored) and len(stored) == 5
    keys = [key for key, _ in pairs]
    assert [v is None for v in batch.get_many(keys)] == [one.get(k) is None for k in keys] == [True] * 2 + [False] * 3
    assert (batch.hits, batch.misses, batch.nbytes) == (one.hits, one.misses, one.nbytes) == (3, 2, 300)
