"""Slide access for training: open a slide, lay a tissue grid at a physical field of view.

Temporary implementation on openslide-python until ``gpfm_engine.open_slide`` and
``gpfm_engine.grid.make_grid`` land; the two functions below keep their signatures when switched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide

from gpfm_engine.errors import SlideError


class _OpenSlideAdapter:
    """OpenSlide with the engine's conventions: RGB uint8 arrays, white outside the image."""

    def __init__(self, path: Path, mpp: float | None) -> None:
        try:
            self._s = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(path, f"cannot open: {exc}") from exc
        self.path = path
        props = self._s.properties
        if mpp is None and openslide.PROPERTY_NAME_MPP_X in props:
            mpp = float(props[openslide.PROPERTY_NAME_MPP_X])
        if mpp is None or not 0.05 < mpp < 50:
            raise SlideError(path, "no trustworthy mpp; set data.mpp to override")
        self.mpp = (mpp, mpp)
        self.dimensions = self._s.dimensions
        self.level_downsamples = self._s.level_downsamples

    def get_best_level_for_downsample(self, d: float) -> int:
        return self._s.get_best_level_for_downsample(d)

    def read_region(self, xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        rgba = np.asarray(self._s.read_region(xy, level, size), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)

    def get_thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(self._s.get_thumbnail(size).convert("RGB"))

    def close(self) -> None:
        self._s.close()

    def __enter__(self) -> "_OpenSlideAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_training_slide(path: Path, mpp: float | None = None) -> _OpenSlideAdapter:
    return _OpenSlideAdapter(Path(path), mpp)


def tissue_grid(slide: _OpenSlideAdapter, fov_um: float, min_tissue: float, tile_px: int = 256,
                overlap: float = 0.0) -> tuple[np.ndarray, int, int, int]:
    """``fov_um`` squares at stride ``(1 - overlap) * fov`` with at least ``min_tissue`` tissue
    (thumbnail mask: coloured and not near-white). Returns (level-0 top-left coords [N, 2], read
    level, read size in px at that level, square size in level-0 px)."""
    size0 = int(round(fov_um / slide.mpp[0]))
    stride = max(1, int(round(size0 * (1.0 - overlap))))
    width, height = slide.dimensions
    cols, rows = (width - size0) // stride + 1, (height - size0) // stride + 1
    if width < size0 or height < size0:
        return np.zeros((0, 2), np.int64), 0, size0, size0
    scale = min(1.0, 1024 / max(width, height))
    thumb = slide.get_thumbnail((max(1, int(width * scale)), max(1, int(height * scale)))).astype(np.int16)
    tissue = ((thumb.max(-1) - thumb.min(-1)) > 20) & (thumb.mean(-1) < 235)
    sy, sx = tissue.shape[0] / height, tissue.shape[1] / width
    coords = []
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * stride, r * stride
            cell = tissue[int(y0 * sy):max(int((y0 + size0) * sy), int(y0 * sy) + 1),
                          int(x0 * sx):max(int((x0 + size0) * sx), int(x0 * sx) + 1)]
            if cell.mean() >= min_tissue:
                coords.append((x0, y0))
    level = slide.get_best_level_for_downsample(size0 / tile_px)
    read_size = int(round(size0 / slide.level_downsamples[level]))
    return np.asarray(coords, dtype=np.int64).reshape(-1, 2), level, read_size, size0
