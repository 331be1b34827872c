"""NumPy/OpenCV implementations of each tissue-mask step, for the kernel reference tests.

Same algorithm as ``gpfm/tissue.h``, written with the library calls a reader already trusts:
cv2.cvtColor for saturation, cv2.medianBlur, cv2.threshold(THRESH_OTSU), cv2.morphologyEx with
getStructuringElement(MORPH_ELLIPSE), cv2.connectedComponentsWithStats, cv2.integral.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np


def over_white(image: np.ndarray) -> np.ndarray:
    """RGB of an RGB or (straight-alpha) RGBA image composited onto white, rounded to nearest."""
    if image.shape[2] == 3:
        return image
    a = image[..., 3:4].astype(np.int64)
    return ((image[..., :3].astype(np.int64) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def score(image: np.ndarray, dark_threshold: int) -> np.ndarray:
    rgb = np.ascontiguousarray(over_white(image))
    s = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].copy()
    s[rgb.max(axis=2) < dark_threshold] = 0
    return s


def median(plane: np.ndarray, k: int) -> np.ndarray:
    return plane.copy() if k == 1 else cv2.medianBlur(plane, k)


def otsu(plane: np.ndarray) -> int:
    level, _ = cv2.threshold(plane, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return int(level)


def ellipse(k: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def morphology(mask: np.ndarray, op: str, k: int) -> np.ndarray:
    ops = {"dilate": cv2.MORPH_DILATE, "erode": cv2.MORPH_ERODE, "close": cv2.MORPH_CLOSE, "open": cv2.MORPH_OPEN}
    return cv2.morphologyEx((mask != 0).astype(np.uint8), ops[op], ellipse(k))


def filter_components(mask: np.ndarray, min_tissue_px: int, min_hole_px: int) -> np.ndarray:
    """Drop 8-connected tissue smaller than min_tissue_px, then fill 4-connected holes (background
    components not touching the border) smaller than min_hole_px."""
    m = (mask != 0).astype(np.uint8)
    if min_tissue_px > 0:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        small = stats[:, cv2.CC_STAT_AREA] < min_tissue_px
        small[0] = False
        m[small[labels] & (m == 1)] = 0
    if min_hole_px > 0:
        background = 1 - m
        n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
        border = np.zeros(n, bool)
        for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            border[edge] = True
        fill = (stats[:, cv2.CC_STAT_AREA] < min_hole_px) & ~border
        fill[0] = False
        m[fill[labels] & (background == 1)] = 1
    return m


def integral(mask: np.ndarray) -> np.ndarray:
    return cv2.integral((mask != 0).astype(np.uint8)).astype(np.int32)


def segment(image: np.ndarray, args: dict[str, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """The whole chain with ``TissueParams.kernel_args`` arguments: (mask 0/1, integral, level)."""
    s = median(score(image, args["dark_threshold"]), args["median_k"])
    level = args["fixed_threshold"] if args["fixed_threshold"] >= 0 else max(otsu(s), args["min_threshold"])
    m = (s > level).astype(np.uint8)
    if args["close_k"] > 1:
        m = morphology(m, "close", args["close_k"])
    if args["open_k"] > 1:
        m = morphology(m, "open", args["open_k"])
    m = filter_components(m, args["min_tissue_px"], args["min_hole_px"])
    return m, integral(m), level


def area_fraction(mask: np.ndarray, scale: tuple[float, float], x0: float, y0: float, size: float) -> float:
    """Tissue fraction of a level-0 square by explicit per-pixel overlap weights (outside = 0)."""
    h, w = mask.shape

    def weights(start: float, n: int, s: float) -> np.ndarray:
        lo, hi = start / s, (start + size) / s
        edges = np.arange(n + 1, dtype=np.float64)
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)

    wx, wy = weights(x0, w, scale[0]), weights(y0, h, scale[1])
    return float(wy @ mask.astype(np.float64) @ wx) / ((size / scale[0]) * (size / scale[1]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a != 0, b != 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --- test slides ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tissue_image(width: int, height: int, seed: int = 0, coverage: float = 0.45, feature_scale: float = 3.0) -> np.ndarray:
    """Cheap tissue-like level-0 pixels for ``slide_factory(image=...)``: the synthetic pattern
    rendered at 1/8 resolution and enlarged (``feature_scale`` shrinks its islands, so small slides
    hold several). Cached and read-only, so the slide factory reuses the slide it wrote."""
    from PIL import Image

    from gpfm_engine import synth

    low = synth.TissuePattern(width, height, 0.25 * feature_scale, seed, coverage).render(
        0, 0, -(-width // 8), -(-height // 8), 8)
    image = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BILINEAR)).copy()
    image.setflags(write=False)
    return image
