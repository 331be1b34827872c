"""Tissue mask + patch grid per slide: engine vs a CLAM-style OpenCV reference on the same thumbnails.

Engine: ``gpfm_engine.tissue.mask_thumbnail`` (compiled kernels, summed-area table) then
``gpfm_engine.grid.make_grid`` (tissue fraction of every candidate in one vectorized lookup).

CLAM-style (``create_patches_fp.py`` / ``WholeSlideImage.segmentTissue`` + ``process_contour``):
OpenCV HSV saturation, median blur, Otsu, close, ``findContours(RETR_CCOMP)`` with contour/hole
area filters; then per contour a grid over its bounding box where each candidate is tested with
``cv2.pointPolygonTest`` on four points (``four_pt``) and against the holes, one Python call per
candidate. CLAM spreads candidates over an ``mp.Pool`` per contour; here they run in one process,
which is faster than a pool on small slides, so the baseline is not slowed by pool start-up.

Both sides get the same thumbnail array (reading it from the slide is not timed) and the same
sizes: median and close kernel, minimum tissue and hole area, patch size and stride. Thumbnails
under ``SMALL_THUMBNAIL_PX`` also get an informational row of back-to-back calls (see there).

Run: ``python -m benchmarks --stage tissue`` or ``python benchmarks/bench_tissue.py``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gpfm_engine import synth
from gpfm_engine.grid import GridParams, make_grid
from gpfm_engine.tissue import TissueMask, TissueParams, mask_thumbnail, read_thumbnail, slide_mpp

log = logging.getLogger(__name__)

GOAL = 5.0
# Thumbnails this small take well under a millisecond on both sides, and a timed round begins with
# the harness's gc.collect(), which leaves caches cold: the single-call row then mostly measures
# cold-start costs. Such cases get a second, informational row timing this many calls back to back.
SMALL_THUMBNAIL_PX = 100_000
BACK_TO_BACK = 20
# A 25 x 20 mm specimen (100k x 80k px at 0.25 µm/px), as large as routine slides get: its 8 µm/px
# thumbnail is rendered directly, since only the thumbnail enters this stage.
LARGE_SPECIMEN_UM = (25_000.0, 20_000.0)


# --- CLAM-style reference ---------------------------------------------------------------------------


@dataclass
class ClamSegmentation:
    """Kept tissue contours and, per contour, its kept holes (thumbnail pixel coordinates)."""

    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    shape: tuple[int, int]


def clam_segment(thumbnail: np.ndarray, median_k: int, close_k: int, min_tissue_px: float,
                 min_hole_px: float) -> ClamSegmentation:
    """CLAM's segmentTissue with ``use_otsu`` on a thumbnail; close uses the elliptical element of the
    engine (CLAM's is a square) so both sides close the same gaps."""
    hsv = cv2.cvtColor(np.ascontiguousarray(thumbnail[..., :3]), cv2.COLOR_RGB2HSV)
    blurred = cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), median_k) if median_k > 1 else hsv[..., 1].copy()
    _, binary = cv2.threshold(blurred, 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    if close_k > 1:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (close_k, close_k)))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    kept, kept_holes = [], []
    if hierarchy is not None:
        parent = hierarchy[0][:, 3]
        for idx in np.flatnonzero(parent == -1):
            holes = [contours[h] for h in np.flatnonzero(parent == idx)]
            area = cv2.contourArea(contours[idx]) - sum(cv2.contourArea(h) for h in holes)
            if area == 0 or not area > min_tissue_px:
                continue
            kept.append(contours[idx])
            kept_holes.append([h for h in holes if cv2.contourArea(h) > min_hole_px])
    return ClamSegmentation(kept, kept_holes, thumbnail.shape[:2])


def clam_mask(seg: ClamSegmentation) -> np.ndarray:
    """The 0/1 mask the contours describe: filled tissue contours minus the inside of kept holes
    (a hole's contour runs through tissue pixels, which stay tissue)."""
    mask = np.zeros(seg.shape, np.uint8)
    cv2.drawContours(mask, seg.contours, -1, 1, thickness=cv2.FILLED)
    for holes in seg.holes:
        cv2.drawContours(mask, holes, -1, 0, thickness=cv2.FILLED)
        cv2.drawContours(mask, holes, -1, 1, thickness=1)
    return mask


def clam_grid(seg: ClamSegmentation, scale: tuple[float, float], patch: int, step: int) -> np.ndarray:
    """CLAM's process_contour with ``four_pt`` and padding: level-0 top-lefts, int64 [N, 2]."""
    coords = []
    for cont, holes in zip(seg.contours, seg.holes):
        cont0 = (cont * np.array(scale)).astype(np.int32)
        holes0 = [(h * np.array(scale)).astype(np.int32) for h in holes]
        x0, y0, w, h = cv2.boundingRect(cont0)
        shift = int(patch // 2 * 0.5)
        for x in range(x0, x0 + w, step):
            for y in range(y0, y0 + h, step):
                cx, cy = x + patch // 2, y + patch // 2
                corners = ((cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift),
                           (cx - shift, cy + shift))
                if not any(cv2.pointPolygonTest(cont0, (float(px), float(py)), False) >= 0 for px, py in corners):
                    continue
                if any(cv2.pointPolygonTest(hole, (x + patch / 2, y + patch / 2), False) > 0 for hole in holes0):
                    continue
                coords.append((x, y))
    return np.array(coords, np.int64).reshape(-1, 2)


# --- inputs -----------------------------------------------------------------------------------------


@dataclass
class Geometry:
    """The OpenSlide-shaped facts ``make_grid`` reads, for thumbnails rendered without a slide file."""

    level_dimensions: tuple[tuple[int, int], ...]
    mpp: tuple[float, float]
    path: str

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


@dataclass
class Case:
    name: str
    thumbnail: np.ndarray
    slide: Any


def rendered_case(size_um: tuple[float, float], mpp: float = 0.25, seed: int = 3) -> Case:
    """A specimen's thumbnail at 8 µm/px rendered straight from the synthetic tissue pattern."""
    w0, h0 = round(size_um[0] / mpp), round(size_um[1] / mpp)
    ds = TissueParams().mpp / mpp
    tw, th = round(w0 / ds), round(h0 / ds)
    pattern = synth.TissuePattern(w0, h0, mpp, seed=seed)
    thumbnail = pattern.render(0, 0, tw, th, ds)
    name = f"rendered {size_um[0] / 1000:g}x{size_um[1] / 1000:g} mm"
    return Case(name, thumbnail, Geometry(((w0, h0),), (mpp, mpp), name))


def slide_case(path: Path) -> Case:
    from gpfm_engine.slide import open_slide

    slide = open_slide(path)
    thumbnail = read_thumbnail(slide, slide_mpp(slide), TissueParams().mpp).pixels
    return Case(path.name, thumbnail, slide)


# --- the two sides ----------------------------------------------------------------------------------


def engine_run(case: Case, params: TissueParams, grid: GridParams) -> int:
    w0, h0 = case.slide.level_dimensions[0]
    th, tw = case.thumbnail.shape[:2]
    scale = (w0 / tw, h0 / th)
    mpp0 = case.slide.mpp
    mpp_um = (mpp0[0] * scale[0], mpp0[1] * scale[1])
    mask, integral, level = mask_thumbnail(case.thumbnail, mpp_um, params)
    tm = TissueMask(mask, integral, case.thumbnail, mpp_um, scale, (w0, h0), level, 0, params)
    return len(make_grid(case.slide, tm, grid))


def baseline_run(case: Case, params: TissueParams, grid: GridParams) -> int:
    w0, h0 = case.slide.level_dimensions[0]
    th, tw = case.thumbnail.shape[:2]
    scale = (w0 / tw, h0 / th)
    mpp0 = case.slide.mpp
    args = params.kernel_args((mpp0[0] * scale[0], mpp0[1] * scale[1]))
    seg = clam_segment(case.thumbnail, args["median_k"], args["close_k"], args["min_tissue_px"], args["min_hole_px"])
    clam_mask(seg)
    patch = round(grid.resolved_fov_um / mpp0[0])
    step = max(1, round(patch * (1 - grid.overlap)))
    return len(clam_grid(seg, scale, patch, step))


def cases(ctx: Any) -> list[Case]:
    out = [rendered_case(LARGE_SPECIMEN_UM), slide_case(ctx.large_slide())]
    out += [slide_case(p) for p in ctx.real_slides()]
    return out


def run(ctx: Any) -> list:
    from benchmarks.harness import compare

    params, grid = TissueParams(), GridParams()
    results = []
    for case in cases(ctx):
        h, w = case.thumbnail.shape[:2]
        n_engine, n_base = engine_run(case, params, grid), baseline_run(case, params, grid)
        results.append(compare(
            f"tissue mask+grid: {case.name}",
            lambda c=case: engine_run(c, params, grid),
            lambda c=case: baseline_run(c, params, grid),
            repeats=ctx.repeats, warmup=ctx.warmup, work=1, units="slides", goal=GOAL,
            note=f"{w}x{h} px thumbnail at {params.mpp:g} µm/px; {n_engine} engine / {n_base} CLAM-style patches",
            baseline_label="CLAM-style (OpenCV)",
        ))
        if h * w <= SMALL_THUMBNAIL_PX:
            results.append(compare(
                f"tissue mask+grid, {BACK_TO_BACK} calls back to back: {case.name}",
                lambda c=case: [engine_run(c, params, grid) for _ in range(BACK_TO_BACK)],
                lambda c=case: [baseline_run(c, params, grid) for _ in range(BACK_TO_BACK)],
                repeats=ctx.repeats, warmup=ctx.warmup, work=BACK_TO_BACK, units="slides",
                note=f"{w}x{h} px thumbnail, the same slide {BACK_TO_BACK} times per timed round: caches warm after "
                     "the first call (informational; the goal is judged on the single-call row)",
                baseline_label="CLAM-style (OpenCV)",
            ))
    return results


def main() -> None:
    import argparse

    from benchmarks.harness import BenchContext, render_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small synthesized slide")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(render_markdown(run(BenchContext(repeats=args.repeats, quick=args.quick))))


if __name__ == "__main__":
    main()
