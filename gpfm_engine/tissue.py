"""Tissue mask of a slide: a thumbnail at a fixed physical resolution, segmented by the compiled kernels.

The thumbnail is always ``TissueParams.mpp`` µm/px (default 8), resampled from the coarsest level
that is at least that fine, so the mask and every size below mean the same tissue whatever the
scanner and pyramid layout. Slides whose level 0 is already coarser are masked at level 0.

Segmentation (``gpfm_engine._core.segment_tissue``, CPU threads or CUDA): HSV saturation with dark
pixels (pen, black borders) zeroed, median blur, Otsu threshold raised to a floor (or a fixed
threshold), elliptical close then open, removal of small tissue and filling of small holes, and a
summed-area table that answers "which fraction of this rectangle is tissue" in O(1).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from gpfm_engine import _core
from gpfm_engine.errors import SlideError, TileDecodeError

logger = logging.getLogger(__name__)

MPP = tuple[float, float]

# A level counts as "at least as fine" as a requested resolution up to this relative excess, which
# absorbs the rounding of level sizes (a 4x level of an odd-sized image is 4.0003x).
LEVEL_MPP_TOLERANCE = 0.01

# Source pixels read per stripe while building the thumbnail: bounds memory on single-level slides.
_STRIPE_BYTES = 64 << 20

# Corrupt tiles named in the thumbnail's warning line (the count covers them all).
_NAMED_TILES = 10


@dataclass(frozen=True)
class TissueParams:
    """Mask settings; sizes are physical and become odd pixel sizes at the thumbnail's resolution.

    ``threshold`` fixes the saturation level (0..255; pixels above it are tissue); ``None`` uses
    Otsu's level, raised to ``min_threshold`` so bare glass (whose Otsu level splits noise) stays
    empty. ``dark_threshold`` zeroes pixels whose brightest channel is below it (0 disables); 20
    rejects black borders and pen while keeping dense nuclei, which a thumbnail averages with
    their surroundings. The median (7 px at 8 µm, CLAM's ``mthresh``) and close (9 px) remove
    speckle and bridge gaps within tissue; the 3 px open drops one-pixel threads. Tissue smaller
    than one 128 x 128 µm patch is dropped and holes smaller than that are filled: neither can
    change which patches reach a 25% tissue fraction by much.
    """

    mpp: float = 8.0
    dark_threshold: int = 20
    median_um: float = 56.0
    threshold: int | None = None
    min_threshold: int = 15
    close_um: float = 72.0
    open_um: float = 24.0
    min_tissue_um2: float = 16384.0
    min_hole_um2: float = 16384.0

    def kernel_args(self, mpp: MPP) -> dict[str, int]:
        """The integer arguments of ``_core.segment_tissue`` for a thumbnail at ``mpp`` µm/px, in
        the order of its parameters (:func:`mask_thumbnail` passes them by position)."""
        px_um = math.sqrt(mpp[0] * mpp[1])
        px_area = mpp[0] * mpp[1]
        return dict(
            dark_threshold=int(self.dark_threshold),
            median_k=odd_size(self.median_um, px_um),
            fixed_threshold=-1 if self.threshold is None else int(self.threshold),
            min_threshold=int(self.min_threshold),
            close_k=odd_size(self.close_um, px_um),
            open_k=odd_size(self.open_um, px_um),
            min_tissue_px=math.ceil(self.min_tissue_um2 / px_area),
            min_hole_px=math.ceil(self.min_hole_um2 / px_area),
        )


# The (settings, thumbnail mpp, kernel arguments) of the last mask_thumbnail call.
_last_args: tuple[TissueParams | None, MPP, tuple[int, ...]] = (None, (0.0, 0.0), ())


def _segment_args(params: TissueParams, mpp: MPP) -> tuple[int, ...]:
    """``params.kernel_args(mpp)`` as positional arguments, remembered for the next call: a run's
    slides share their settings (frozen, so the same object means the same values) and often the
    thumbnail resolution, and on a small thumbnail rebuilding the arguments, hashing the settings
    or passing keywords costs a noticeable share of a cold call."""
    global _last_args
    last = _last_args
    if last[0] is params and last[1] == mpp:
        return last[2]
    args = tuple(params.kernel_args(mpp).values())
    _last_args = (params, mpp, args)
    return args


def odd_size(um: float, px_um: float) -> int:
    """The odd pixel size nearest to ``um`` micrometres (1 = no-op), capped at the kernels' 255."""
    if um <= 0:
        return 1
    return int(min(255, 2 * math.floor(um / px_um / 2) + 1))


@dataclass
class TissueMask:
    """A slide's tissue mask and the summed-area table behind :meth:`fraction`.

    ``mask`` is uint8 0/1 [H, W]; ``integral`` int32 [H + 1, W + 1]; one mask pixel covers
    ``scale`` level-0 pixels per axis (= ``mpp_um`` micrometres). ``tiles_skipped`` counts corrupt
    stored tiles that the thumbnail shows as background (``skip_corrupt_tiles``).
    """

    mask: np.ndarray
    integral: np.ndarray
    thumbnail: np.ndarray
    mpp_um: MPP
    scale: tuple[float, float]
    level0_size: tuple[int, int]
    threshold: int
    source_level: int
    params: TissueParams = field(default_factory=TissueParams)
    tiles_skipped: int = 0

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the whole slide that is tissue."""
        h, w = self.mask.shape
        return float(self.integral[h, w]) / (h * w)

    def fraction(self, x0: float, y0: float, w: float, h: float) -> float:
        """Tissue fraction of the level-0 rectangle (x0, y0, w, h); area outside the slide counts as
        background. O(1): exact area integral of the mask through the summed-area table."""
        return float(self.fractions(np.array([[x0, y0]], np.float64), w, h)[0])

    def fractions(self, coords: np.ndarray, w: float, h: float | None = None) -> np.ndarray:
        """:meth:`fraction` (float64 [N]) of every level-0 top-left in ``coords`` [N, 2], one size."""
        h = w if h is None else h
        sx, sy = self.scale
        xy = np.asarray(coords, np.float64).reshape(-1, 2)
        u0, v0 = xy[:, 0] / sx, xy[:, 1] / sy
        u1, v1 = u0 + w / sx, v0 + h / sy
        area = (self._integral_at(u1, v1) - self._integral_at(u0, v1) - self._integral_at(u1, v0)
                + self._integral_at(u0, v0))
        return area / ((w / sx) * (h / sy))

    def _integral_at(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Mask area in [0, u] x [0, v] (mask pixels, real-valued corners): the summed-area table is
        bilinear inside each pixel because the mask is constant there."""
        hgt, wid = self.mask.shape
        u = np.clip(u, 0.0, wid)
        v = np.clip(v, 0.0, hgt)
        i = np.minimum(np.floor(u).astype(np.int64), wid - 1)
        j = np.minimum(np.floor(v).astype(np.int64), hgt - 1)
        a, b = u - i, v - j
        t = self.integral
        return ((1 - a) * (1 - b) * t[j, i] + a * (1 - b) * t[j, i + 1] + (1 - a) * b * t[j + 1, i]
                + a * b * t[j + 1, i + 1])


def slide_mpp(slide: Any, mpp: float | None = None) -> MPP:
    """(x, y) µm per level-0 pixel: ``mpp`` when given, else the slide's; never guessed."""
    if mpp is not None:
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"{slide_path(slide)}: mpp must be a positive number, got {mpp!r}")
        return (float(mpp), float(mpp))
    native = getattr(slide, "mpp", None)
    if native is None:
        raise SlideError(slide_path(slide), "the slide does not state its pixel size (µm per pixel); "
                                            "pass mpp= (--mpp) with the value from the scanner")
    return (float(native[0]), float(native[1]))


def finest_level_at_most(slide: Any, target_mpp: float, mpp0: MPP) -> int:
    """The coarsest level whose x mpp is <= ``target_mpp`` (within tolerance); 0 if none is. A
    level's mpp comes from its exact width ratio to level 0 (as ``Slide.level_mpp``)."""
    dims = slide.level_dimensions
    mpp_w0, limit = mpp0[0] * dims[0][0], target_mpp * (1 + LEVEL_MPP_TOLERANCE)
    best = 0
    for level, (width, _) in enumerate(dims):
        if mpp_w0 / width <= limit:
            best = level
    return best


def slide_path(slide: Any) -> str:
    return str(getattr(slide, "path", None) or getattr(slide, "_filename", None) or slide)


class Thumbnail(NamedTuple):
    """A slide's RGB uint8 thumbnail, the level it was resampled from, and how many corrupt stored
    tiles of that level it shows as white background."""

    pixels: np.ndarray
    level: int
    tiles_skipped: int = 0


def read_thumbnail(slide: Any, mpp0: MPP, target_mpp: float, skip_corrupt_tiles: bool = False) -> Thumbnail:
    """RGB uint8 thumbnail at ``target_mpp`` (or level 0 when it is coarser) and its source level.

    Box-resampled from the source level in horizontal stripes, so a single-level slide never has
    to be in memory whole. Reads with an alpha channel (OpenSlide's ``read_region``) are
    composited onto white, as a viewer shows areas without image data. A corrupt stored tile
    raises ``TileDecodeError``, or with ``skip_corrupt_tiles`` becomes white background (one
    warning per slide names the tiles), so one bad tile does not cost the whole slide its mask.
    """
    level = finest_level_at_most(slide, target_mpp, mpp0)
    lw, lh = slide.level_dimensions[level]
    w0, h0 = slide.level_dimensions[0]
    if mpp0[0] >= target_mpp * (1 - LEVEL_MPP_TOLERANCE) and level == 0:
        out_w, out_h = w0, h0
    else:
        out_w = max(1, round(w0 * mpp0[0] / target_mpp))
        out_h = max(1, round(h0 * mpp0[1] / target_mpp))
    step = lh / out_h  # source rows per thumbnail row
    rows_per_stripe = max(1, int(_STRIPE_BYTES // max(1, lw * 4 * math.ceil(step))))
    stripes, skipped = [], []
    for j0 in range(0, out_h, rows_per_stripe):
        j1 = min(out_h, j0 + rows_per_stripe)
        top = math.floor(j0 * step)
        bottom = min(lh, math.ceil(j1 * step))
        region = _read_rows(slide, level, top, bottom, skip_corrupt_tiles, skipped)
        if region.size != (out_w, j1 - j0):
            box = (0.0, j0 * step - top, float(lw), j1 * step - top)
            region = region.resize((out_w, j1 - j0), Image.Resampling.BOX, box=box)
        stripes.append(np.asarray(region))
    if skipped:
        named = ", ".join(map(str, skipped[:_NAMED_TILES])) + (", ..." if len(skipped) > _NAMED_TILES else "")
        logger.warning("%s: %d corrupt tile(s) of level %d shown as background in the tissue thumbnail "
                       "(tiles %s)", slide_path(slide), len(skipped), level, named)
    return Thumbnail(np.concatenate(stripes, axis=0), level, len(skipped))


def _read_rows(slide: Any, level: int, top: int, bottom: int, skip_corrupt_tiles: bool,
               skipped: list[int]) -> Image.Image:
    """Rows [top, bottom) of ``level``, whole width, as an RGB image. When skipping, a stripe that
    hits a corrupt tile is read again one stored tile at a time; the pieces that fail stay white
    and their tile indices are added to ``skipped``."""
    lw = slide.level_dimensions[level][0]
    downsample = slide.level_downsamples[level]
    try:
        return _rgb_image(slide, slide.read_region((0, round(top * downsample)), level, (lw, bottom - top)))
    except TileDecodeError:
        if not skip_corrupt_tiles:
            raise
    layout = slide.tile_layout(level)
    tw, th = layout.tile_width, layout.tile_height
    stripe = np.full((bottom - top, lw, 3), 255, np.uint8)
    for y in range(top - top % th, bottom, th):
        y0, y1 = max(y, top), min(y + th, bottom)
        for x in range(0, lw, tw):
            x1 = min(x + tw, lw)
            location = (round(x * downsample), round(y0 * downsample))
            try:
                piece = _rgb_image(slide, slide.read_region(location, level, (x1 - x, y1 - y0)))
            except TileDecodeError as exc:
                if exc.index not in skipped:
                    skipped.append(exc.index)
                continue
            stripe[y0 - top : y1 - top, x:x1] = np.asarray(piece)
    return Image.fromarray(stripe)


def _rgb_image(slide: Any, region: Any) -> Image.Image:
    """A read region (array or PIL image, RGB or RGBA) as an RGB PIL image on white."""
    image = region if isinstance(region, Image.Image) else Image.fromarray(np.ascontiguousarray(region))
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        raise SlideError(slide_path(slide), f"read_region gave {image.mode} pixels, expected RGB or RGBA")
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def mask_thumbnail(thumbnail: Any, mpp_um: MPP, params: TissueParams | None = None) -> tuple[Any, Any, int]:
    """(mask 0/1, summed-area table, threshold level) of an RGB(A) uint8 [H, W, C] thumbnail at
    ``mpp_um``; alpha is composited onto white by the kernel.

    Runs on the device the array lives on: NumPy arrays on the CPU threads (GIL released), CUDA
    tensors on torch's current stream (outputs are then CUDA tensors).
    """
    args = _segment_args(params or TissueParams(), tuple(mpp_um))
    if not _is_cuda(thumbnail):
        return _core.segment_tissue(np.ascontiguousarray(thumbnail), None, None, None, *args)
    import torch

    h, w = thumbnail.shape[:2]
    mask = torch.empty((h, w), dtype=torch.uint8, device=thumbnail.device)
    integral = torch.empty((h + 1, w + 1), dtype=torch.int32, device=thumbnail.device)
    level = torch.empty(1, dtype=torch.int32, device=thumbnail.device)
    stream = torch.cuda.current_stream(thumbnail.device).cuda_stream
    _core.segment_tissue(thumbnail, mask, integral, level, *args, stream)
    return mask, integral, int(level.item())


def segment_tissue(slide: Any, params: TissueParams | None = None, *, mpp: float | None = None,
                   skip_corrupt_tiles: bool = False) -> TissueMask:
    """The tissue mask of an OpenSlide-shaped slide (``gpfm_engine.open_slide`` or compatible).

    ``mpp`` overrides the slide's µm per level-0 pixel; a slide without one is refused
    (``SlideError``) rather than guessed. ``skip_corrupt_tiles`` masks corrupt stored tiles as
    background instead of raising ``TileDecodeError`` (see :func:`read_thumbnail`).
    """
    params = params or TissueParams()
    mpp0 = slide_mpp(slide, mpp)
    thumbnail, level, tiles_skipped = read_thumbnail(slide, mpp0, params.mpp, skip_corrupt_tiles)
    w0, h0 = slide.level_dimensions[0]
    h, w = thumbnail.shape[:2]
    scale = (w0 / w, h0 / h)
    mpp_um = (mpp0[0] * scale[0], mpp0[1] * scale[1])
    mask, integral, threshold = mask_thumbnail(thumbnail, mpp_um, params)
    return TissueMask(mask=mask, integral=integral, thumbnail=thumbnail, mpp_um=mpp_um, scale=scale,
                      level0_size=(w0, h0), threshold=threshold, source_level=level, params=params,
                      tiles_skipped=tiles_skipped)


def _is_cuda(array: Any) -> bool:
    # NumPy arrays first: the attribute probe raises and catches AttributeError on them
    return not isinstance(array, np.ndarray) and bool(getattr(array, "is_cuda", False))
