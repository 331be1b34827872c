"""Each tissue-mask kernel against its NumPy/OpenCV reference (tests/tissue_reference.py).

Tolerance: none. Every step is integer or replays OpenCV's own arithmetic (fixed-point saturation,
Otsu's double sequence, the ellipse's sqrt-and-round), so outputs must be identical, on random
data and on real thumbnails.
"""
from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import tissue_reference as ref
from gpfm_engine import _core
from gpfm_engine.tissue import TissueParams, mask_thumbnail


def smooth_mask(rng: np.random.Generator, shape: tuple[int, int], sigma: float, level: float) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), sigma)
    return (noise > np.quantile(noise, level)).astype(np.uint8)


def tissue_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random RGB: pink/purple blobs with noise on near-white glass, and a dark streak (pen)."""
    tissue = smooth_mask(rng, shape, 6, 0.6)[..., None]
    glass = np.array([242, 240, 238]) + rng.normal(0, 3, (*shape, 3))
    stain = np.array([200, 120, 170]) + rng.normal(0, 25, (*shape, 3))
    image = np.where(tissue, stain, glass)
    image[shape[0] // 3 : shape[0] // 3 + 4] = rng.normal(15, 5, (min(4, shape[0] - shape[0] // 3), shape[1], 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def run_plane(fn, src: np.ndarray, *args) -> np.ndarray:
    dst = np.full(src.shape[:2], 77, np.uint8)
    fn(src, dst, *args)
    return dst


# --- score ----------------------------------------------------------------------------------------


def test_saturation_matches_opencv_for_every_max_min_pair() -> None:
    v, m = np.meshgrid(np.arange(256), np.arange(256))
    hi, lo = np.maximum(v, m), np.minimum(v, m)
    image = np.stack([hi, (hi + lo) // 2, lo], -1).astype(np.uint8)
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):  # the max in each channel
        rgb = np.ascontiguousarray(image[..., perm])
        assert np.array_equal(run_plane(_core.tissue_score, rgb, 0), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1])


@pytest.mark.parametrize("dark", [-3, 0, 1, 20, 128, 255, 256])
def test_score_with_darkness_and_alpha(dark: int) -> None:
    rng = np.random.default_rng(abs(dark))
    rgba = rng.integers(0, 256, (61, 47, 4), dtype=np.uint8)
    rgba[:5, :, 3] = 0  # fully transparent rows -> white -> saturation 0
    assert np.array_equal(run_plane(_core.tissue_score, rgba, dark), ref.score(rgba, dark))
    assert not run_plane(_core.tissue_score, rgba, dark)[:5].any()
    rgb = np.ascontiguousarray(rgba[..., :3])
    assert np.array_equal(run_plane(_core.tissue_score, rgb, dark), ref.score(rgb, dark))


def test_score_reads_strided_views() -> None:
    big = np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    view = big[3:35, 10:50]
    assert np.array_equal(run_plane(_core.tissue_score, view, 30), ref.score(np.ascontiguousarray(view), 30))


# --- median ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 15, 31])
@pytest.mark.parametrize("shape", [(1, 1), (2, 40), (40, 2), (97, 131)])
def test_median_matches_opencv(k: int, shape: tuple[int, int]) -> None:
    src = np.random.default_rng(k * 1000 + shape[0]).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(run_plane(_core.median_blur, src, k), ref.median(src, k))


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("levels", [4, 256])
def test_median_matches_opencv_across_row_tasks(k: int, levels: int) -> None:
    """Large enough to be split into row tasks of odd length (the networks work in row pairs and
    a ring of sorted rows per task); few levels give many ties."""
    src = np.random.default_rng(k + levels).integers(0, levels, (1501, 700), dtype=np.uint8)
    assert np.array_equal(run_plane(_core.median_blur, src, k), ref.median(src, k))


@pytest.mark.parametrize("w", [15, 16, 17, 31, 33, 63, 64, 65, 129])
def test_median_matches_opencv_at_vector_widths(w: int) -> None:
    src = np.random.default_rng(w).integers(0, 256, (23, w), dtype=np.uint8)
    for k in (3, 5, 7):
        assert np.array_equal(run_plane(_core.median_blur, src, k), ref.median(src, k))


# --- histogram and Otsu ---------------------------------------------------------------------------


def test_histogram_matches_bincount() -> None:
    src = np.random.default_rng(0).integers(0, 256, (300, 1111), dtype=np.uint8)
    hist = np.full(256, -1, np.int64)
    _core.histogram256(src, hist)
    assert np.array_equal(hist, np.bincount(src.ravel(), minlength=256))


def test_otsu_level_is_opencvs_on_random_histograms() -> None:
    rng = np.random.default_rng(1)
    for trial in range(400):
        n = int(rng.integers(1, 4000))
        parts = [rng.normal(rng.uniform(0, 255), rng.uniform(0.5, 50), n)]
        if trial % 2:
            parts.append(rng.normal(rng.uniform(0, 255), rng.uniform(0.5, 50), int(rng.integers(1, 2000))))
        plane = np.clip(np.concatenate(parts), 0, 255).astype(np.uint8).reshape(1, -1)
        hist = np.bincount(plane.ravel(), minlength=256).astype(np.int64)
        assert _core.otsu_threshold(hist) == ref.otsu(plane), trial


@pytest.mark.parametrize("values", [[0], [255], [7, 7, 7], [3, 200], [0, 255, 255, 255]])
def test_otsu_degenerate_histograms(values: list[int]) -> None:
    plane = np.array([values], np.uint8)
    assert _core.otsu_threshold(np.bincount(plane.ravel(), minlength=256).astype(np.int64)) == ref.otsu(plane)


# --- morphology -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["dilate", "erode", "close", "open"])
@pytest.mark.parametrize("k", [1, 3, 5, 9, 15, 31, 63])
def test_morphology_matches_opencv_ellipse(op: str, k: int) -> None:
    rng = np.random.default_rng(k)
    for shape in [(1, 1), (4, 9), (83, 120)]:
        src = smooth_mask(rng, shape, 2, 0.55) * 255 if min(shape) > 4 else (rng.random(shape) < 0.5).astype(np.uint8)
        out = run_plane(_core.morphology, src, op, k)
        assert np.array_equal(out, ref.morphology(src, op, k)), shape


@pytest.mark.parametrize("w", [64, 65, 128, 150, 192, 250, 256, 257, 300])
def test_morphology_matches_opencv_at_word_counts(w: int) -> None:
    """Rows of 1..4 words take code compiled for their word count, longer rows the general loops."""
    rng = np.random.default_rng(w)
    src = smooth_mask(rng, (37, w), 1.5, 0.5)
    for op in ("dilate", "erode", "close", "open"):
        for k in (3, 9, 15):
            assert np.array_equal(run_plane(_core.morphology, src, op, k), ref.morphology(src, op, k)), (op, k)


# --- components -----------------------------------------------------------------------------------


def test_filter_components_matches_opencv_labelling() -> None:
    rng = np.random.default_rng(2)
    for trial in range(120):
        shape = (int(rng.integers(1, 90)), int(rng.integers(1, 90)))
        src = smooth_mask(rng, shape, rng.uniform(0.5, 3), rng.uniform(0.3, 0.7)) * int(rng.integers(1, 256))
        min_tissue, min_hole = int(rng.integers(0, 60)), int(rng.integers(0, 60))
        out = run_plane(_core.filter_components, src, min_tissue, min_hole)
        assert np.array_equal(out, ref.filter_components(src, min_tissue, min_hole)), (trial, shape)


def test_components_merged_by_many_threads_match() -> None:
    """Rows are merged concurrently through the lock-free union-find; a large noisy mask spreads
    them over several tasks and makes threads race on the same trees."""
    mask = smooth_mask(np.random.default_rng(9), (2200, 1500), 0.8, 0.5)
    before = _core.num_threads()
    try:
        _core.set_num_threads(8)
        out = run_plane(_core.filter_components, mask, 30, 30)
    finally:
        _core.set_num_threads(before)
    assert np.array_equal(out, ref.filter_components(mask, 30, 30))


def test_holes_touching_the_border_stay_and_diagonal_tissue_is_one_component() -> None:
    src = np.zeros((7, 7), np.uint8)
    src[1:6, 1:6] = 1
    src[2:5, 2:5] = 0       # a 9-px hole: filled when min_hole > 9
    src[0, 0] = 1           # touches the ring diagonally: same 8-connected component
    out = run_plane(_core.filter_components, src, 2, 10)
    assert out[2:5, 2:5].all() and out[0, 0] == 1
    notch = src.copy()
    notch[3, 5:] = 0        # the hole now reaches the border through a 4-connected channel
    assert not run_plane(_core.filter_components, notch, 0, 100)[2:5, 2:5].any()


# --- integral -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (37, 53), (400, 1500)])
def test_integral_matches_opencv(shape: tuple[int, int]) -> None:
    mask = (np.random.default_rng(sum(shape)).random(shape) < 0.5).astype(np.uint8) * 3
    sat = np.empty((shape[0] + 1, shape[1] + 1), np.int32)
    _core.integral_image(mask, sat)
    assert np.array_equal(sat, ref.integral(mask))


# --- whole chain ----------------------------------------------------------------------------------


PARAMS = [TissueParams(), TissueParams(threshold=30, open_um=0), TissueParams(median_um=0, close_um=0, min_tissue_um2=0)]


@pytest.mark.parametrize("params", PARAMS, ids=["default", "fixed-threshold", "bare"])
def test_chain_matches_reference_on_random_thumbnails(params: TissueParams) -> None:
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (5, 300), (211, 157)]:
        image = tissue_like(rng, shape)
        mask, integral, level = mask_thumbnail(image, (8.0, 8.0), params)
        ref_mask, ref_integral, ref_level = ref.segment(image, params.kernel_args((8.0, 8.0)))
        assert level == ref_level
        assert np.array_equal(mask, ref_mask) and ref.iou(mask, ref_mask) >= 0.99
        assert np.array_equal(integral, ref_integral)


@pytest.mark.parametrize("shape", [(1, 1), (1, 77), (77, 1), (2, 129), (40, 15), (33, 63), (31, 64), (29, 65),
                                   (17, 127), (19, 128), (23, 129), (12, 200)])
def test_chain_matches_reference_at_awkward_sizes(shape: tuple[int, int]) -> None:
    """Single rows and columns, widths around the 16/32/64-pixel vectors and the 64-pixel words
    (partial vectors, partial last words, fused unpack + summed-area row)."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    image = tissue_like(rng, shape)
    for params in PARAMS:
        mask, integral, level = mask_thumbnail(image, (8.0, 8.0), params)
        ref_mask, ref_integral, ref_level = ref.segment(image, params.kernel_args((8.0, 8.0)))
        assert level == ref_level and np.array_equal(mask, ref_mask) and np.array_equal(integral, ref_integral)


@pytest.mark.parametrize("simd", ["portable", "avx2"])
def test_every_simd_path_matches_the_references(simd: str) -> None:
    """GPFM_SIMD caps the vector ISA the kernels choose once per process ("portable": the plain
    C++ loops non-x86 builds run; "avx2": no AVX-512), so this file runs again under each cap."""
    env = dict(os.environ, GPFM_SIMD=simd)
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", "not simd_path"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_chain_on_real_patches_tiled_into_a_thumbnail(shared_data) -> None:
    files = sorted((shared_data / "patches").rglob("*.tif"))[:12] + sorted((shared_data / "patches").rglob("*.png"))[:12]
    tiles = [cv2.resize(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), (96, 96)) for f in files]
    tiles += [np.full((96, 96, 3), 243, np.uint8)] * (30 - len(tiles))  # glass between specimens
    image = np.concatenate([np.concatenate(tiles[r * 6 : r * 6 + 6], 1) for r in range(5)], 0)
    mask, integral, level = mask_thumbnail(image, (8.0, 8.0))
    ref_mask, ref_integral, ref_level = ref.segment(image, TissueParams().kernel_args((8.0, 8.0)))
    assert level == ref_level and np.array_equal(mask, ref_mask) and np.array_equal(integral, ref_integral)
    assert 0.3 < mask.mean() < 0.95


def test_thread_count_does_not_change_the_mask() -> None:
    image = tissue_like(np.random.default_rng(4), (700, 900))
    before = _core.num_threads()
    try:
        _core.set_num_threads(1)
        one = mask_thumbnail(image, (8.0, 8.0))
        _core.set_num_threads(4)
        four = mask_thumbnail(image, (8.0, 8.0))
    finally:
        _core.set_num_threads(before)
    assert np.array_equal(one[0], four[0]) and np.array_equal(one[1], four[1]) and one[2] == four[2]


# --- argument checks ------------------------------------------------------------------------------


def test_bad_arguments_are_value_errors() -> None:
    plane = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="odd"):
        _core.median_blur(plane, plane.copy(), 4)
    with pytest.raises(ValueError, match="op"):
        _core.morphology(plane, plane.copy(), "thin", 3)
    with pytest.raises(ValueError, match="shape"):
        _core.median_blur(plane, np.zeros((4, 5), np.uint8), 3)
    with pytest.raises(ValueError, match="RGB"):
        _core.tissue_score(np.zeros((4, 4, 2), np.uint8), plane, 0)
    readonly = plane.copy()
    readonly.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _core.median_blur(plane, readonly, 3)
    with pytest.raises(ValueError, match="int32"):
        _core.integral_image(plane, np.zeros((5, 5), np.int64))


def test_numbers_in_a_foreign_byte_order_are_refused_not_misread() -> None:
    """A big-endian int32 table (NumPy dtype '>i4', or a buffer whose format says so) would be read
    as garbage counts; it is refused like any other wrong dtype, whichever way it arrives."""
    foreign = np.zeros((5, 5), np.dtype(np.int32).newbyteorder())
    with pytest.raises(ValueError, match="int32"):
        _core.integral_image(np.zeros((4, 4), np.uint8), foreign)
    with pytest.raises(ValueError, match="int32"):
        _core.patch_grid(memoryview(foreign), 100, 100, 10.0, 10.0, 25.0, 25.0, 0.25)
    native = np.zeros((5, 5), np.int32)
    _core.integral_image(np.ones((4, 4), np.uint8), native)
    assert native[-1, -1] == 16
    coords, _ = _core.patch_grid(memoryview(native), 100, 100, 100.0, 100.0, 25.0, 25.0, 0.25)
    assert coords.tolist() == [[0, 0]]
