"""The Slide protocol: an OpenSlide-shaped pyramid plus stored-tile access, as a template method.

Every public read validates its request in level-0 units here, calls the backend's private read,
and normalizes the result to RGB uint8 with white wherever there is no image (outside the level,
transparent pixels, missing tiles). Backends implement only the private hooks, so behaviour that
callers rely on (the mpp override, white background, tile padding, the decoded-tile cache, error
types) is the same for every format.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from gpfm_engine.decode.cpu import to_rgb
from gpfm_engine.errors import SlideError, TileDecodeError
from gpfm_engine.slide.mpp import MPP
from gpfm_engine.slide.tile_cache import TileCache

WHITE = 255
# read_tiles(executor=...) splits its work into this many tasks: enough for every thread of a
# 16-core pool, and small enough pieces that a thread slowed by other load leaves little tail
TILE_CHUNKS = 16


class TileLayout(NamedTuple):
    """The stored-tile grid of one level: tile ``index = row * columns + column``.

    ``compression`` names the codec of ``read_raw_tiles`` streams (see ``gpfm_engine.decode``);
    ``"openslide"`` means tiles exist only decoded, through ``read_tiles``.
    """

    tile_width: int
    tile_height: int
    columns: int
    rows: int
    compression: str

    @property
    def count(self) -> int:
        """Number of tiles in the level."""
        return self.columns * self.rows

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left (x, y) of tile ``index`` in the level's own pixels."""
        row, col = divmod(index, self.columns)
        return col * self.tile_width, row * self.tile_height


def downsamples_from_dimensions(dims: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    """OpenSlide's rule: the mean of the width and height ratios to level 0."""
    w0, h0 = dims[0]
    return tuple((w0 / w + h0 / h) / 2.0 for w, h in dims)


class LazyImages(Mapping[str, np.ndarray]):
    """Associated images (label, macro, thumbnail), decoded on first access and kept.

    ``sizes`` maps each name to its (width, height), known without decoding.
    """

    def __init__(self, sizes: Mapping[str, tuple[int, int]], load: Callable[[str], np.ndarray]) -> None:
        self.sizes = dict(sizes)
        self._names = tuple(self.sizes)
        self._load = load
        self._done: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._done:
            self._done[name] = to_rgb(np.ascontiguousarray(self._load(name)))
        return self._done[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Slide(ABC):
    """A whole-slide image. Subclasses fill the attributes below in ``__init__`` and the hooks.

    Reads are thread-safe: backends keep no per-read mutable state apart from the locked cache.
    """

    backend: str = ""

    path: Path
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    objective_power: float | None
    properties: dict[str, str]
    associated_images: LazyImages

    def __init__(self, path: str | Path, *, mpp: float | None = None, tile_cache: TileCache | None = None) -> None:
        self.path = Path(path)
        if mpp is not None and not (isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"{self.path}: mpp override must be a positive number, got {mpp!r}")
        self._mpp_override = float(mpp) if mpp is not None else None
        self._native_mpp: MPP | None = None
        self._native_mpp_source: str | None = None
        self._cache = tile_cache if tile_cache is not None else TileCache()
        self._cache_token = object()
        self._closed = False
        self.objective_power = None
        self.properties = {}
        self.associated_images = LazyImages({}, _no_image)

    # -- geometry and physical units ------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> MPP | None:
        """(x, y) micrometres per level-0 pixel: the override if given, else the slide's, else None."""
        if self._mpp_override is not None:
            return (self._mpp_override, self._mpp_override)
        return self._native_mpp

    @property
    def mpp_source(self) -> str | None:
        """Where :attr:`mpp` comes from: ``"override"``, a metadata source name, or None."""
        return "override" if self._mpp_override is not None else self._native_mpp_source

    def require_mpp(self) -> MPP:
        """:attr:`mpp`, or a ``SlideError`` saying to pass an override: geometry is never guessed."""
        if self.mpp is None:
            raise SlideError(self.path, "no trustworthy physical pixel size (mpp) in the slide; pass mpp= / --mpp")
        return self.mpp

    def level_mpp(self, level: int) -> MPP | None:
        """µm per pixel of ``level``, from its exact per-axis size ratio to level 0."""
        self._check_level(level)
        base = self.mpp
        if base is None:
            return None
        (w0, h0), (w, h) = self.level_dimensions[0], self.level_dimensions[level]
        return (base[0] * w0 / w, base[1] * h0 / h)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample:
                best = level
        return best

    # -- regions --------------------------------------------------------------------------------

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` of ``level`` whose top-left is level-0 ``location``.

        As in OpenSlide, the level-space origin is ``location / level_downsample``; it is rounded
        to the nearest level pixel (OpenSlide resamples sub-pixel origins instead). Areas outside
        the image are white.
        """
        self._check_open()
        self._check_level(level)
        x0, y0 = (_as_int(v, "location", self.path) for v in location)
        w, h = (_as_int(v, "size", self.path) for v in size)
        if w < 0 or h < 0:
            raise ValueError(f"{self.path}: negative region size {w}x{h}")
        ds = self.level_downsamples[level]
        x, y = math.floor(x0 / ds + 0.5), math.floor(y0 / ds + 0.5)
        lw, lh = self.level_dimensions[level]
        ix0, iy0, ix1, iy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        inside = (ix0, iy0, ix1, iy1) == (x, y, x + w, y + h)
        if inside and w and h:  # the common case: the backend's pixels are the answer
            return np.require(to_rgb(self._read_level(level, x, y, w, h)), requirements=["C", "W"])
        out = np.full((h, w, 3), WHITE, np.uint8)
        if ix1 > ix0 and iy1 > iy0:
            pixels = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
            out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = to_rgb(pixels)
        return out

    def get_thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 image fitting in ``size`` (aspect kept), from the best level, Lanczos-resized."""
        from PIL import Image

        w0, h0 = self.dimensions
        downsample = max(w0 / size[0], h0 / size[1])
        level = self.get_best_level_for_downsample(downsample)
        image = Image.fromarray(self.read_region((0, 0), level, self.level_dimensions[level]))
        image.thumbnail(size, Image.Resampling.LANCZOS)
        return np.asarray(image)

    # -- stored tiles ---------------------------------------------------------------------------

    def tile_layout(self, level: int) -> TileLayout:
        """The stored-tile grid of ``level``."""
        self._check_level(level)
        return self._tile_layout(level)

    def read_raw_tiles(self, level: int, indices: Sequence[int]) -> list[bytes]:
        """Self-contained compressed streams of stored tiles (``b""`` = missing tile: background)."""
        self._check_open()
        return self._read_raw_tiles(level, self._check_indices(level, indices))

    def read_tiles(self, level: int, indices: Sequence[int], executor: Executor | None = None) -> list[np.ndarray]:
        """Decoded stored tiles, read-only RGB uint8 ``[tile_h, tile_w, 3]``, through the cache.

        Pixels beyond the level's edge are white. ``executor`` (caller-owned) spreads decoding over
        threads. A corrupt tile raises ``TileDecodeError`` naming the level and tile index.
        """
        self._check_open()
        indices = self._check_indices(level, indices)
        found = self._cache.get_many([(self._cache_token, level, i) for i in indices])
        missing = sorted({i for i, tile in zip(indices, found) if tile is None})
        if missing:
            decoded = dict(zip(missing, self._load_tiles(level, missing, executor)))
            found = [tile if tile is not None else decoded[i] for i, tile in zip(indices, found)]
        return found

    def _load_tiles(self, level: int, indices: list[int], executor: Executor | None) -> list[np.ndarray]:
        """Read, decode, pad and cache tiles, in about ``TILE_CHUNKS`` chunks on ``executor`` when
        given (each chunk does its own reads and cache insertions too, so no stage runs serially
        in the calling thread)."""
        def load(chunk: list[int]) -> list[np.ndarray]:
            tiles = [self._pad_tile(level, i, t) for i, t in zip(chunk, self._decode_tiles(level, chunk))]
            return self._cache.put_many(((self._cache_token, level, i), t) for i, t in zip(chunk, tiles))

        if executor is None or len(indices) < 2:
            return load(indices)
        step = max(1, -(-len(indices) // TILE_CHUNKS))
        futures = [executor.submit(load, indices[s : s + step]) for s in range(0, len(indices), step)]
        try:
            return [tile for future in futures for tile in future.result()]
        finally:
            for future in futures:
                future.cancel()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file and this slide's cached tiles; further reads raise ``SlideError``."""
        if not self._closed:
            self._closed = True
            self._cache.discard(self._cache_token)
            self._close()

    def __enter__(self) -> Slide:
        return self

    def __del__(self) -> None:
        # a forgotten close() must not leak a file descriptor per slide over a 10k-slide run
        if getattr(self, "_closed", True) is False:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass

    def __reduce__(self) -> tuple:
        """Pickling reopens the file by path (e.g. in DataLoader workers); caches are not shared."""
        return (_reopen, (type(self), str(self.path), self._mpp_override))

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vendor={self.vendor!r}, levels={self.level_count})"

    # -- hooks ----------------------------------------------------------------------------------

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of an in-bounds rectangle in ``level``'s own coordinates (any to_rgb layout)."""

    @abstractmethod
    def _tile_layout(self, level: int) -> TileLayout:
        """Stored-tile grid of a validated level."""

    @abstractmethod
    def _decode_tiles(self, level: int, indices: list[int]) -> list[np.ndarray]:
        """Decoded pixels (covering at least the in-image part) of validated tile indices."""

    def _read_raw_tiles(self, level: int, indices: list[int]) -> list[bytes]:
        raise SlideError(self.path, f"the {self.backend} backend has no raw tile streams; use read_tiles")

    def _close(self) -> None:
        """Release backend resources."""

    # -- helpers --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(self.path, "slide is closed")

    def _check_level(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level!r} out of range 0..{self.level_count - 1}")

    def _check_indices(self, level: int, indices: Sequence[int]) -> list[int]:
        count = self.tile_layout(level).count
        out = [int(i) for i in indices]
        bad = [i for i in out if not 0 <= i < count]
        if bad:
            raise ValueError(f"{self.path}: level {level} tile index {bad[0]} out of range 0..{count - 1}")
        return out

    def _pad_tile(self, level: int, index: int, pixels: np.ndarray) -> np.ndarray:
        """Full-size RGB tile with white beyond the level's edge; too little data is an error."""
        layout = self._tile_layout(level)
        th, tw = layout.tile_height, layout.tile_width
        x, y = layout.origin(index)
        lw, lh = self.level_dimensions[level]
        vw, vh = min(tw, lw - x), min(th, lh - y)
        rgb = to_rgb(pixels) if pixels.ndim != 3 or pixels.shape[2] != 3 else pixels
        if rgb.shape[0] < vh or rgb.shape[1] < vw:
            raise TileDecodeError(self.path, level, index,
                                  f"decoded {rgb.shape[1]}x{rgb.shape[0]} px, tile needs {vw}x{vh}")
        if rgb.shape[:2] == (th, tw):
            if vw == tw and vh == th:
                return rgb
            if rgb.flags.writeable:  # whiten the decoder's edge filler in place
                rgb[vh:] = WHITE
                rgb[:, vw:] = WHITE
                return rgb
        out = np.full((th, tw, 3), WHITE, np.uint8)
        out[:vh, :vw] = rgb[:vh, :vw]
        return out


def _reopen(cls: type[Slide], path: str, mpp: float | None) -> Slide:
    return cls(path, mpp=mpp)


def _no_image(name: str) -> np.ndarray:
    raise KeyError(name)


def _as_int(value: object, what: str, path: Path) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{path}: {what} must be integers, got {value!r}")
