"""Whole-slide images behind one OpenSlide-shaped protocol, with a fast raw-tile path for TIFFs.

``open_slide(path)`` picks the backend: the tifffile fast path (``tiff``) for TIFF-family files it
can describe faithfully, OpenSlide (``openslide``) for everything else. Pass ``backend=`` to force
one, ``mpp=`` to override (or supply) the physical pixel size.
"""
from __future__ import annotations

from pathlib import Path

from gpfm_engine.errors import MissingExtraError, SlideError
from gpfm_engine.slide.base import Slide, TileLayout
from gpfm_engine.slide.describe import describe_slide
from gpfm_engine.slide.tile_cache import TileCache

__all__ = ["BACKENDS", "Slide", "TileCache", "TileLayout", "describe_slide", "open_slide"]

BACKENDS: tuple[str, ...] = ("tiff", "openslide")

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Containers whose TIFF part is only a preview: the pixels live in files we do not read.
_PREVIEW_ONLY = {".vsi": "Olympus VSI keeps its pixels in .ets files, which are not supported"}


def open_slide(path: str | Path, backend: str | None = None, mpp: float | None = None, *,
               tile_cache: TileCache | None = None) -> Slide:
    """Open a whole-slide image; every failure is a one-line ``SlideError`` naming file and cause.

    ``mpp`` (µm per level-0 pixel) replaces whatever the slide states; ``tile_cache`` may be
    shared between slides (default: a private 64 MiB cache per slide).
    """
    from gpfm_engine.slide.openslide_backend import OpenSlideSlide
    from gpfm_engine.slide.tiff import FastPathRefused, TiffSlide

    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown slide backend {backend!r}; choose from {BACKENDS}")
    path = Path(path)
    magic = _first_bytes(path)
    options = dict(mpp=mpp, tile_cache=tile_cache)
    if backend == "tiff":
        return TiffSlide(path, **options)
    if backend == "openslide":
        return OpenSlideSlide(path, **options)
    if path.suffix.lower() in _PREVIEW_ONLY:
        raise SlideError(path, _PREVIEW_ONLY[path.suffix.lower()])
    if magic not in _TIFF_MAGIC:
        try:
            return OpenSlideSlide(path, **options)
        except SlideError as exc:
            raise SlideError(path, f"not a supported slide: {exc.cause}") from None
    try:
        return TiffSlide(path, **options)
    except FastPathRefused as fast:
        try:
            return OpenSlideSlide(path, **options)
        except (SlideError, MissingExtraError) as slow:
            cause = slow.cause if isinstance(slow, SlideError) else str(slow)
            raise SlideError(path, f"{fast.cause}; OpenSlide fallback: {cause}") from None


def _first_bytes(path: Path) -> bytes:
    """The file's magic number; missing, unreadable and empty files fail here with a clear cause."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise SlideError(path, "no such file") from None
    except IsADirectoryError:
        raise SlideError(path, "is a directory, not a slide file") from None
    except OSError as exc:
        raise SlideError(path, f"cannot read ({exc.strerror})") from None
    if not magic:
        raise SlideError(path, "empty file (0 bytes)")
    return magic
