"""segment_tissue on slides: thumbnail geometry, pyramid independence, O(1) fractions, mpp rules,
alpha and single-level slides, QC picture, and real slides against a CLAM-style OpenCV reference.

Tolerances: the mask of a thumbnail equals the NumPy/OpenCV reference exactly; masks of the same
tissue read through different pyramids (different source levels) agree to IoU >= 0.97, since the
box-resampled thumbnails differ by rounding; CLAM-style masks agree to IoU >= 0.95 (explained
below where they do not).
"""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from PIL import Image

import tissue_reference as ref
from _pipeline_utils import corrupt_tile, tiny_weights  # noqa: F401 - fixture
from benchmarks.bench_tissue import clam_mask, clam_segment
from gpfm_engine.errors import SlideError, TileDecodeError
from gpfm_engine.grid import make_grid
from gpfm_engine.qc import CONTOUR_RGB, PATCH_RGB, write_qc
from gpfm_engine.slide import open_slide
from gpfm_engine.tissue import TissueParams, segment_tissue

SIZE = (4096, 3072)


@pytest.fixture(scope="module")
def slide_path(slide_factory):
    return slide_factory(image=ref.tissue_image(*SIZE), mpp=0.25, downsample=2, associated=False)


def test_thumbnail_is_8_um_from_the_finest_level_not_finer_than_needed(slide_path) -> None:
    with open_slide(slide_path) as slide:
        mask = segment_tissue(slide)
        assert mask.mpp_um == pytest.approx((8.0, 8.0), rel=0.01)
        assert mask.mask.shape == (96, 128) and mask.thumbnail.shape == (96, 128, 3)
        assert mask.source_level == 4  # levels at 0.25, 0.5, 1, 2, 4 µm/px: 4 µm is the coarsest <= 8
        assert mask.scale == (32.0, 32.0) and mask.level0_size == SIZE
        assert 0.1 < mask.tissue_fraction < 0.5


def test_mask_is_the_reference_algorithm_on_the_thumbnail(slide_path) -> None:
    with open_slide(slide_path) as slide:
        mask = segment_tissue(slide)
    expected, integral, level = ref.segment(mask.thumbnail, TissueParams().kernel_args(mask.mpp_um))
    assert mask.threshold == level and np.array_equal(mask.mask, expected) and np.array_equal(mask.integral, integral)


def test_pyramid_layout_does_not_change_the_mask(slide_factory, slide_path) -> None:
    image = ref.tissue_image(*SIZE)
    masks = []
    for path in (slide_path, slide_factory(image=image, mpp=0.25, downsample=4, associated=False),
                 slide_factory(image=image, mpp=0.25, levels=1, associated=False)):
        with open_slide(path) as slide:
            masks.append(segment_tissue(slide))
    assert [m.source_level for m in masks] == [4, 2, 0]
    for other in masks[1:]:
        assert other.mask.shape == masks[0].mask.shape
        assert np.abs(other.thumbnail.astype(int) - masks[0].thumbnail).mean() < 2.0
        assert ref.iou(other.mask, masks[0].mask) >= 0.97


def test_fraction_is_the_exact_area_integral(slide_path) -> None:
    with open_slide(slide_path) as slide:
        mask = segment_tissue(slide)
    rng = np.random.default_rng(0)
    coords = np.column_stack([rng.uniform(-600, SIZE[0] + 100, 300), rng.uniform(-600, SIZE[1] + 100, 300)])
    sizes = rng.uniform(1, 900, 300)
    for (x, y), s in zip(coords, sizes):
        assert mask.fraction(x, y, s, s) == pytest.approx(ref.area_fraction(mask.mask, mask.scale, x, y, s), abs=1e-9)
    batch = mask.fractions(coords, 512)
    single = [ref.area_fraction(mask.mask, mask.scale, x, y, 512) for x, y in coords]
    np.testing.assert_allclose(batch, single, rtol=0, atol=1e-9)
    assert mask.fraction(0, 0, *SIZE) == pytest.approx(mask.tissue_fraction)


def test_unknown_mpp_is_refused_unless_given(slide_factory) -> None:
    path = slide_factory(image=ref.tissue_image(*SIZE), mpp=None, downsample=2, associated=False)
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(SlideError, match="mpp"):
            segment_tissue(slide)
        mask = segment_tissue(slide, mpp=0.25)
    assert mask.mpp_um == pytest.approx((8.0, 8.0), rel=0.01)


def test_openslide_objects_with_alpha_work(slide_path) -> None:
    openslide = pytest.importorskip("openslide")
    with openslide.OpenSlide(str(slide_path)) as raw:
        assert raw.read_region((0, 0), 0, (1, 1)).mode == "RGBA"
        mask = segment_tissue(raw, mpp=0.25)
    with open_slide(slide_path) as slide:
        ours = segment_tissue(slide)
    assert ref.iou(mask.mask, ours.mask) >= 0.99


class TransparentEdges:
    """An OpenSlide-shaped slide whose reads are RGBA with a transparent band (as OpenSlide returns
    for areas without image data)."""

    level_dimensions = ((512, 384),)
    level_downsamples = (1.0,)
    level_count = 1
    mpp = (8.0, 8.0)
    path = "transparent.svs"

    def read_region(self, location, level, size):
        w, h = size
        out = np.zeros((h, w, 4), np.uint8)
        out[..., :3] = ref.tissue_image(512, 384, feature_scale=16)[location[1] : location[1] + h, :w]
        out[..., 3] = 255
        rows = np.arange(location[1], location[1] + h)
        out[rows < 64] = 0  # fully transparent black: must read as white glass, not dark tissue
        return out


def test_transparent_pixels_are_background() -> None:
    mask = segment_tissue(TransparentEdges(), TissueParams(dark_threshold=0))
    assert mask.thumbnail.shape == (384, 512, 3)
    assert (mask.thumbnail[:60] == 255).all()
    assert not mask.mask[:60].any() and mask.mask[64:].any()


def test_single_level_and_coarse_slides(slide_factory) -> None:
    path = slide_factory(image=ref.tissue_image(1024, 768, feature_scale=12), mpp=16.0, levels=1, associated=False)
    with open_slide(path) as slide:
        mask = segment_tissue(slide)
    assert mask.source_level == 0 and mask.mask.shape == (768, 1024)  # never upsampled to 8 µm
    assert mask.mpp_um == (16.0, 16.0) and mask.mask.any()


def test_qc_picture(slide_path, tmp_path) -> None:
    with open_slide(slide_path) as slide:
        mask = segment_tissue(slide)
        grid = make_grid(slide, mask)
    path = write_qc(tmp_path / "qc" / "slide.png", mask, grid, max_side=100)
    with Image.open(path) as image:
        assert image.format == "PNG" and max(image.size) == 100
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == CONTOUR_RGB).all(axis=2).any() and (pixels == PATCH_RGB).all(axis=2).any()


# --- real slides ------------------------------------------------------------------------------------

REAL_BRIGHTFIELD = [
    "aperio/CMU-1-Small-Region.svs",                            # H&E, 0.499 µm/px, one level
    "dicom/camelyon-ezwsi/multiframe_camelyon_challenge_image.dcm",  # H&E lymph node, 29 µm/px
    "dicom/wsi2dcm-jpeg/jpeg.dicom",                            # Giemsa-like bone marrow, 16.8 µm/px
]
FLUORESCENCE = "hamamatsu-ndpi/test3-DAPI-2-(387).ndpi"         # DAPI: bright nuclei on black


def clam_style(mask) -> np.ndarray:
    args = mask.params.kernel_args(mask.mpp_um)
    return clam_mask(clam_segment(mask.thumbnail, args["median_k"], args["close_k"], args["min_tissue_px"],
                                  args["min_hole_px"]))


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_BRIGHTFIELD + [FLUORESCENCE])
def test_real_slides_equal_the_reference_algorithm(shared_data, name) -> None:
    with open_slide(shared_data / "wsi" / name) as slide:
        mask = segment_tissue(slide)
    expected, integral, level = ref.segment(mask.thumbnail, mask.params.kernel_args(mask.mpp_um))
    assert mask.threshold == level and np.array_equal(mask.mask, expected)
    assert np.array_equal(mask.integral, integral)


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_BRIGHTFIELD)
def test_real_brightfield_slides_agree_with_clam_style(shared_data, name) -> None:
    with open_slide(shared_data / "wsi" / name) as slide:
        mask = segment_tissue(slide)
    assert mask.mask.any()
    assert ref.iou(mask.mask, clam_style(mask)) >= 0.95


@pytest.mark.realdata
def test_fluorescence_miss_is_the_darkness_channel(shared_data) -> None:
    """The one miss: on a DAPI fluorescence scan the background is black, so CLAM-style calls the
    saturated black half the slide tissue. The darkness channel rejects it by design (brightfield
    tissue is never that dark); without it the masks agree."""
    with open_slide(shared_data / "wsi" / FLUORESCENCE) as slide:
        mask = segment_tissue(slide)
        bare = segment_tissue(slide, TissueParams(dark_threshold=0))
    clam = clam_style(mask)
    assert ref.iou(mask.mask, clam) < 0.5
    assert ref.iou(bare.mask, clam) >= 0.95
    # every pixel CLAM-style adds is dark or within the median + close reach of dark pixels
    args = mask.params.kernel_args(mask.mpp_um)
    dark = (mask.thumbnail.max(axis=2) < mask.params.dark_threshold).astype(np.uint8)
    near_dark = ref.morphology(dark, "dilate", args["median_k"] + args["close_k"])
    assert near_dark[(clam == 1) & (mask.mask == 0)].mean() > 0.99


def test_params_scale_with_the_thumbnail_resolution() -> None:
    at8 = TissueParams().kernel_args((8.0, 8.0))
    at4 = TissueParams().kernel_args((4.0, 4.0))
    assert (at8["median_k"], at8["close_k"], at8["open_k"]) == (7, 9, 3)
    assert at4["median_k"] > at8["median_k"] and at4["min_tissue_px"] == 4 * at8["min_tissue_px"]
    assert dataclasses.replace(TissueParams(), open_um=0).kernel_args((8.0, 8.0))["open_k"] == 1


CORRUPT_TILE = 7  # row 1, column 2 of the 5 x 4 tiles of 240 px: inside the slide, away from its edges


@pytest.fixture(scope="module")
def single_level_pair(slide_factory, tmp_path_factory):
    """(clean, corrupt) copies of a single-level slide; the corrupt one has CORRUPT_TILE zeroed."""
    clean = slide_factory(size=(1200, 960), mpp=0.5, tile=240, levels=1, coverage=0.7, associated=False)
    path = tmp_path_factory.mktemp("corrupt") / "corrupt.svs"
    shutil.copy(clean, path)
    corrupt_tile(path, 0, CORRUPT_TILE)
    return clean, path


def test_corrupt_tile_of_a_single_level_slide_is_background_when_skipping(single_level_pair, caplog) -> None:
    """A corrupt stored tile fails the thumbnail by default; with skip_corrupt_tiles it is painted
    white (background), counted, and named in one warning, and the rest of the mask is unchanged."""
    clean, path = single_level_pair
    tile, index = 240, CORRUPT_TILE
    with open_slide(clean) as slide:
        assert slide.level_count == 1
        good = segment_tissue(slide)
    with open_slide(path) as slide:
        with pytest.raises(TileDecodeError):
            segment_tissue(slide)
        with caplog.at_level("WARNING", logger="gpfm_engine.tissue"):
            mask = segment_tissue(slide, skip_corrupt_tiles=True)
    assert mask.tiles_skipped == 1 and good.tiles_skipped == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "corrupt.svs" in warnings[0] and "level 0" in warnings[0]
    assert f"tiles {index})" in warnings[0]
    # the tile's thumbnail pixels (16 level-0 px each) are white, and the mask away from it is unchanged
    # (inside, a 15 x 15 px gap within tissue is a hole below min_hole_um2, which the mask fills)
    sx, sy = mask.scale
    x0, y0 = (index % 5) * tile, (index // 5) * tile
    rows = slice(int(np.ceil(y0 / sy)), int((y0 + tile) // sy))
    cols = slice(int(np.ceil(x0 / sx)), int((x0 + tile) // sx))
    assert (mask.thumbnail[rows, cols] == 255).all() and not (good.thumbnail[rows, cols] == 255).all()
    away = np.ones(mask.mask.shape, bool)
    margin = 8  # median, close and component filters reach this far (thumbnail px)
    away[max(0, rows.start - margin): rows.stop + margin, max(0, cols.start - margin): cols.stop + margin] = False
    assert np.array_equal(mask.mask[away], good.mask[away])


def test_engine_masks_a_single_level_slide_with_a_corrupt_tile_unless_told_to_fail(
        single_level_pair, tiny_weights) -> None:  # noqa: F811 - pytest fixture
    """Engine.plan follows on_tile_error: skip masks the corrupt tile as background, fail raises."""
    from gpfm_engine.engine import Engine

    _, path = single_level_pair
    with open_slide(path) as slide:
        plan = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu").plan(slide)
        assert plan.mask.tiles_skipped == 1 and plan.num_patches > 0
        assert Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu").meta(plan)["mask_tiles_skipped"] == 1
        strict = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", on_tile_error="fail")
        with pytest.raises(TileDecodeError, match=f"level 0 tile {CORRUPT_TILE}"):
            strict.plan(slide)
