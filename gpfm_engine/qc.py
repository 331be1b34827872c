"""QC picture of one slide: thumbnail, tissue-mask contour and the kept patches, as a small PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gpfm_engine.grid import PatchGrid
from gpfm_engine.tissue import TissueMask

CONTOUR_RGB = (0, 200, 0)
PATCH_RGB = (20, 60, 230)


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: tissue pixels with a 4-neighbour outside the tissue (or the image)."""
    m = np.pad(mask != 0, 1, constant_values=False)
    inner = m[1:-1, 1:-1]
    return inner & ~(m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:])


def render_qc(mask: TissueMask, grid: PatchGrid, max_side: int = 1024) -> Image.Image:
    """The QC picture: the thumbnail scaled to ``max_side`` px on its long side (small ones are
    enlarged so the patch outlines stay readable), mask contour, kept patches outlined."""
    h, w = mask.mask.shape
    scale = max_side / max(h, w)
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.NEAREST
    image = Image.fromarray(mask.thumbnail).resize((out_w, out_h), resample)
    small_mask = np.asarray(Image.fromarray(mask.mask * 255).resize((out_w, out_h), Image.Resampling.NEAREST))
    pixels = np.array(image)
    pixels[mask_contour(small_mask)] = CONTOUR_RGB
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    fx = out_w / grid.level0_size[0]
    fy = out_h / grid.level0_size[1]
    size = grid.patch_size_level0_int
    for x, y in grid.coords.tolist():
        draw.rectangle((x * fx, y * fy, (x + size) * fx - 1, (y + size) * fy - 1), outline=PATCH_RGB)
    return image


def write_qc(path: str | Path, mask: TissueMask, grid: PatchGrid, max_side: int = 1024) -> Path:
    """Write :func:`render_qc` as a PNG (fast zlib level) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_qc(mask, grid, max_side).save(path, format="PNG", compress_level=3)
    return path
