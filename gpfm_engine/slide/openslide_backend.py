"""The OpenSlide fallback: MRXS, SCN, BIF, VMS/VMU, DICOM-WSI and any TIFF the fast path refuses.

Behind the same protocol as the fast path: regions come from ``openslide.read_region`` (RGBA,
composited on white by the base class), and stored tiles are emulated with region reads on the
grid OpenSlide reports (``openslide.level[N].tile-width``), so tile-based callers work unchanged;
there are no raw streams. openslide-python is imported only when this backend is used.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpfm_engine.errors import MissingExtraError, SlideError, exception_summary
from gpfm_engine.slide import mpp as mpp_parsers
from gpfm_engine.slide.base import LazyImages, Slide, TileLayout
from gpfm_engine.slide.tile_cache import TileCache

DEFAULT_TILE = 256  # emulated tile size where OpenSlide reports none


def _import_openslide():
    try:
        import openslide
    except ImportError as exc:  # also raised when the OpenSlide shared library is missing
        raise MissingExtraError("openslide-python", "openslide", "reading slides through OpenSlide") from exc
    return openslide


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide."""

    backend = "openslide"

    def __init__(self, path: str | Path, *, mpp: float | None = None, tile_cache: TileCache | None = None) -> None:
        super().__init__(path, mpp=mpp, tile_cache=tile_cache)
        openslide = _import_openslide()
        self._error_types = (openslide.OpenSlideError,)
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(self.path, "format not recognised by OpenSlide") from exc
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(self.path, f"OpenSlide cannot open it: {self._reason(exc)}") from exc
        osr = self._osr
        try:
            props = dict(osr.properties)
            sizes = {name: (int(props[f"openslide.associated.{name}.width"]),
                            int(props[f"openslide.associated.{name}.height"])) for name in osr.associated_images}
        except (openslide.OpenSlideError, KeyError, ValueError) as exc:
            osr.close()
            raise SlideError(self.path, f"OpenSlide cannot read metadata: {self._reason(exc)}") from exc
        self.vendor = props.get("openslide.vendor", "unknown")
        self.level_dimensions = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in osr.level_downsamples)
        self._native_mpp = mpp_parsers.from_openslide(props)
        self._native_mpp_source = "openslide" if self._native_mpp else None
        power = props.get("openslide.objective-power")
        self.objective_power = float(power) if power else None
        self.properties = props
        self.associated_images = LazyImages(sizes, self._load_associated)
        self._layouts = [self._emulated_layout(level) for level in range(len(self.level_dimensions))]

    def _emulated_layout(self, level: int) -> TileLayout:
        prop = self.properties.get
        tw = int(prop(f"openslide.level[{level}].tile-width", DEFAULT_TILE))
        th = int(prop(f"openslide.level[{level}].tile-height", DEFAULT_TILE))
        w, h = self.level_dimensions[level]
        return TileLayout(tw, th, -(-w // tw), -(-h // th), "openslide")

    # -- hooks ----------------------------------------------------------------------------------

    def _tile_layout(self, level: int) -> TileLayout:
        return self._layouts[level]

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        location = (round(x * ds), round(y * ds))
        try:
            image = self._osr.read_region(location, level, (w, h))
        except self._error_types as exc:
            raise SlideError(self.path, f"OpenSlide read failed at level {level} ({x}, {y}) {w}x{h}: "
                                        f"{self._reason(exc)}") from exc
        return np.asarray(image)

    def _decode_tiles(self, level: int, indices: list[int]) -> list[np.ndarray]:
        layout = self._layouts[level]
        lw, lh = self.level_dimensions[level]
        out = []
        for index in indices:
            x, y = layout.origin(index)
            out.append(self._read_level(level, x, y, min(layout.tile_width, lw - x), min(layout.tile_height, lh - y)))
        return out

    def _load_associated(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._osr.associated_images[name])
        except self._error_types as exc:
            raise SlideError(self.path, f"associated image {name!r}: {self._reason(exc)}") from exc

    def _reason(self, exc: BaseException) -> str:
        """OpenSlide's message without its ``Reading <path>:`` prefix (our messages name the file)."""
        return exception_summary(exc).replace(f"Reading {self.path}: ", "")

    def _close(self) -> None:
        self._osr.close()
