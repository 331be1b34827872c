"""A thread-safe LRU of decoded stored tiles, bounded by bytes rather than by count.

Patches overlap stored tiles (a 512-px patch on 240-px tiles touches up to 9 of them, and its
neighbours share most), so decoding each stored tile once per neighbourhood saves most of the
decode work. A byte budget keeps memory predictable whatever the tile size. One cache may be
shared by several slides: keys start with a per-slide token.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Iterable

import numpy as np

DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class TileCache:
    """LRU mapping ``key -> read-only ndarray`` holding at most ``max_bytes`` of pixels.

    ``max_bytes=0`` disables caching. Arrays are stored read-only, so a caller cannot corrupt
    what another caller reads; an array larger than the whole budget is not cached.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        """The cached array (now most recently used), or None."""
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[Hashable]) -> list[np.ndarray | None]:
        """:meth:`get` of every key under one lock acquisition (a batch asks for hundreds of tiles,
        and a lock round trip per tile is serial work on the thread that waits for the pool)."""
        out: list[np.ndarray | None] = []
        with self._lock:
            for key in keys:
                value = self._items.get(key)
                if value is None:
                    self.misses += 1
                else:
                    self._items.move_to_end(key)
                    self.hits += 1
                out.append(value)
        return out

    def put(self, key: Hashable, value: np.ndarray) -> np.ndarray:
        """Cache ``value`` (made read-only) and evict least recently used entries over budget."""
        return self.put_many([(key, value)])[0]

    def put_many(self, items: Iterable[tuple[Hashable, np.ndarray]]) -> list[np.ndarray]:
        """:meth:`put` of every ``(key, value)`` in order under one lock acquisition; returns the
        (now read-only) values. Arrays larger than the whole budget are not cached."""
        items = list(items)
        for _, value in items:
            value.flags.writeable = False
        with self._lock:
            for key, value in items:
                if value.nbytes > self.max_bytes:
                    continue
                old = self._items.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._items[key] = value
                self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
        return [value for _, value in items]

    def discard(self, prefix: Hashable) -> None:
        """Drop every entry whose key tuple starts with ``prefix`` (a closed slide's tiles)."""
        with self._lock:
            for key in [k for k in self._items if isinstance(k, tuple) and k and k[0] == prefix]:
                self._bytes -= self._items.pop(key).nbytes

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0
