"""make_grid: µm-exact geometry at several scanner resolutions, patch selection checked against the
reference mask, and the empty cases.

Tolerances: the effective field of view is within 0.5% of the request (the level-0 patch size is
rounded to whole pixels); tissue fractions match an explicit per-pixel overlap computation on the
NumPy/OpenCV reference mask within 1e-9.
"""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest

import tissue_reference as ref
from gpfm_engine.errors import SlideError
from gpfm_engine.grid import GridParams, candidate_coords, kept_patches, make_grid
from gpfm_engine.slide import open_slide
from gpfm_engine.tissue import TissueMask, TissueParams, segment_tissue

SIZE = (4096, 3072)


def slide_at(slide_factory, mpp: float | None, **kwargs):
    return open_slide(slide_factory(image=ref.tissue_image(*SIZE), mpp=mpp, downsample=2, associated=False, **kwargs))


@pytest.mark.parametrize("mpp, read_level", [(0.25, 1), (0.5, 0), (0.2282, 1), (0.263, 1)])
def test_geometry_is_micrometre_exact(slide_factory, mpp: float, read_level: int) -> None:
    with slide_at(slide_factory, mpp) as slide:
        grid = make_grid(slide)
        level_mpp = slide.level_mpp(grid.read_level)[0]
    assert grid.fov_um == 128.0 and grid.mpp_level0 == pytest.approx(mpp)
    assert grid.patch_size_level0 == pytest.approx(128.0 / mpp)
    assert grid.patch_size_level0_int == round(128.0 / mpp)
    assert grid.fov_um_effective == pytest.approx(128.0, rel=0.005)
    assert grid.mpp_target == pytest.approx(128.0 / 224)
    assert grid.mpp_effective == pytest.approx(grid.fov_um_effective / 224)
    # the coarsest level still at least as fine as the model input: never upsampled
    assert grid.read_level == read_level and level_mpp <= grid.mpp_target
    assert grid.patch_size_read == pytest.approx(grid.patch_size_level0_int * mpp / level_mpp)
    assert grid.stride_level0 == grid.patch_size_level0 and len(grid) > 5
    coords = grid.coords
    assert coords.dtype == np.int64 and coords.shape == (len(grid), 2)
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert np.array_equal(order, np.arange(len(grid)))  # row-major: y, then x
    steps = coords / grid.stride_level0
    assert np.abs(steps - np.round(steps)).max() * grid.stride_level0 <= 0.5 + 1e-9


def test_kept_patches_are_exactly_those_over_the_threshold(slide_factory) -> None:
    with slide_at(slide_factory, 0.25) as slide:
        mask = segment_tissue(slide)
        grid = make_grid(slide, mask, GridParams(overlap=0.5))
    expected, _, _ = ref.segment(mask.thumbnail, TissueParams().kernel_args(mask.mpp_um))
    size = grid.patch_size_level0_int
    reference = np.array([ref.area_fraction(expected, mask.scale, x, y, size)
                          for x, y in candidate_coords(*SIZE, grid.stride_level0)])
    assert (reference >= 0.25).sum() == len(grid)
    for (x, y), fraction in zip(grid.coords, grid.tissue_fraction):
        truth = ref.area_fraction(expected, mask.scale, x, y, size)
        assert truth >= 0.25 and fraction == pytest.approx(truth, abs=1e-6)
    assert grid.stride_level0 == pytest.approx(grid.patch_size_level0 / 2)


def test_no_tissue_region_larger_than_a_patch_is_left_out(slide_factory) -> None:
    with slide_at(slide_factory, 0.5) as slide:
        mask = segment_tissue(slide)
        grid = make_grid(slide, mask)
    covered = np.zeros(mask.mask.shape, np.uint8)
    sx, sy = mask.scale
    size = grid.patch_size_level0_int
    for x, y in grid.coords:
        covered[int(y // sy) : int(np.ceil((y + size) / sy)), int(x // sx) : int(np.ceil((x + size) / sx))] = 1
    patch_area = (size / sx) * (size / sy)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.mask, connectivity=8)
    big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] > patch_area]
    assert big
    for i in big:
        assert covered[labels == i].any(), f"tissue region {i} ({stats[i, cv2.CC_STAT_AREA]} px) has no patch"
    uncovered = mask.mask & (1 - covered)
    assert uncovered.sum() < 0.1 * mask.mask.sum()


def test_patches_may_cross_the_image_edge() -> None:
    class Geometry:
        level_dimensions = ((1280, 1280),)
        level_count = 1
        mpp = (0.25, 0.25)
        path = "edge"

    ones = np.ones((40, 40), np.uint8)
    mask = TissueMask(ones, ref.integral(ones), np.zeros((40, 40, 3), np.uint8), (8.0, 8.0), (32.0, 32.0),
                      (1280, 1280), 0, 0)
    grid = make_grid(Geometry(), mask)
    assert grid.coords.tolist() == [[0, 0], [512, 0], [1024, 0], [0, 512], [512, 512], [1024, 512],
                                    [0, 1024], [512, 1024], [1024, 1024]]
    assert grid.tissue_fraction[2] == pytest.approx(0.5) and grid.tissue_fraction[8] == pytest.approx(0.25)


def test_all_background_gives_zero_patches_and_a_warning(slide_factory, caplog) -> None:
    blank = slide_factory(image=ref.tissue_image(2048, 1536, coverage=0.0), mpp=0.25, associated=False)
    with open_slide(blank) as slide, caplog.at_level(logging.WARNING, logger="gpfm_engine.grid"):
        grid = make_grid(slide)
    assert len(grid) == 0 and grid.coords.shape == (0, 2) and grid.coords.dtype == np.int64
    assert grid.empty_reason == "no tissue found"
    assert "zero patches" in caplog.text and "no tissue found" in caplog.text


def test_slide_smaller_than_a_patch_gives_zero_patches(slide_factory, caplog) -> None:
    tiny = slide_factory(image=np.ascontiguousarray(ref.tissue_image(2048, 1536)[700:1100, 900:1300]), mpp=0.25,
                         associated=False, levels=1)
    with open_slide(tiny) as slide, caplog.at_level(logging.WARNING, logger="gpfm_engine.grid"):
        grid = make_grid(slide)
    assert len(grid) == 0 and "smaller than one patch" in grid.empty_reason and "zero patches" in caplog.text


def test_unknown_mpp_is_refused_unless_given(slide_factory) -> None:
    with slide_at(slide_factory, None) as slide:
        with pytest.raises(SlideError, match="pass mpp="):
            make_grid(slide)
        grid = make_grid(slide, mpp=0.25)
    assert grid.patch_size_level0_int == 512 and len(grid) > 0


def test_magnification_sugar_uses_the_real_mpp(slide_factory) -> None:
    with slide_at(slide_factory, 0.263) as slide:
        grid = make_grid(slide, params=GridParams(mag=20, patch_size=512))
    assert grid.fov_um == 256.0  # 512 px at 20x = 0.5 µm/px
    assert grid.patch_size_level0_int == 973  # not the 1024 a nominal 40x would read
    assert grid.fov_um_effective == pytest.approx(256.0, rel=0.005)


@pytest.mark.parametrize("kwargs", [dict(mag=20), dict(overlap=1.0), dict(overlap=-0.1), dict(fov_um=0),
                                    dict(target_size=0), dict(mag=0, patch_size=256)])
def test_invalid_params(kwargs) -> None:
    with pytest.raises(ValueError):
        GridParams(**kwargs)


@pytest.mark.parametrize("seed, stride, size, threshold", [(0, 512.0, 512, 0.25), (1, 333.7, 401, 0.1),
                                                           (2, 97.25, 130, 0.6), (3, 1000.5, 1200, 0.0)])
def test_compiled_lattice_equals_candidates_and_mask_fractions(seed: int, stride: float, size: int,
                                                               threshold: float) -> None:
    """make_grid's compiled pass keeps exactly the candidate_coords whose TissueMask.fractions
    reaches the threshold, with the same fractions (bit for bit), on blobby random masks whose mask
    pixels cover a non-integer number of level-0 pixels."""
    rng = np.random.default_rng(seed)
    h, w = 57 + seed, 83 - seed
    mask = (cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2.0) > 0.5).astype(np.uint8)
    integral = np.zeros((h + 1, w + 1), np.int32)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    width, height = round(w * 31.3), round(h * 29.7)
    tm = TissueMask(mask, integral, np.zeros((h, w, 3), np.uint8), (8.0, 8.0), (width / w, height / h),
                    (width, height), 0, 0)
    coords, fraction = kept_patches(tm, width, height, stride, size, threshold)
    candidates = candidate_coords(width, height, stride)
    reference = tm.fractions(candidates, size)
    keep = reference >= threshold
    assert np.array_equal(coords, candidates[keep])
    assert np.array_equal(fraction, reference[keep].astype(np.float32))
