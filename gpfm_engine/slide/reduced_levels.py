"""OpenSlide's extra Hamamatsu levels: stored JPEG levels decoded at 1/2, 1/4 and 1/8 scale.

OpenSlide's Hamamatsu driver (VMS/VMU and NDPI) offers, besides every stored level, the levels
libjpeg produces when it decodes that level's tiles with DCT scaling (``scale_denom`` 2, 4, 8: a
reduced inverse DCT, no resampling), wherever the stored tile's width and height divide by the
factor. Levels are keyed by width and later ones replace earlier ones, so every width comes from
the smallest stored level that yields it (a stored level always beats a reduced larger one).
Following the same rule keeps level count, sizes, downsamples and pixels equal to OpenSlide's,
which is what callers porting OpenSlide code (level indices, ``get_best_level_for_downsample``)
rely on.
"""
from __future__ import annotations

from typing import Sequence

from gpfm_engine.slide.base import TileLayout

SCALE_DENOMS = (2, 4, 8)


def reduced_levels(dimensions: Sequence[tuple[int, int]], layouts: Sequence[TileLayout]) -> list[tuple[int, int]]:
    """``(stored level, scale denominator)`` of every level OpenSlide shows, widest first.

    ``dimensions`` and ``layouts`` describe the stored levels, widest first; denominator 1 is
    the stored level itself. Only JPEG levels get reduced versions (the only ones libjpeg scales).
    """
    by_width: dict[int, tuple[int, int]] = {}
    for level, ((width, _), layout) in enumerate(zip(dimensions, layouts)):
        by_width[width] = (level, 1)
        if layout.compression != "jpeg":
            continue
        for denom in SCALE_DENOMS:
            if layout.tile_width % denom == 0 and layout.tile_height % denom == 0:
                by_width[width // denom] = (level, denom)
    return [by_width[width] for width in sorted(by_width, reverse=True)]
