"""Both backends against OpenSlide itself: every real slide OpenSlide opens, and synthesized slides.

Rules compared (stated once here):
- dimensions, level count, level sizes and vendor: equal. For Hamamatsu this includes the levels
  OpenSlide adds beyond the stored ones (stored JPEG levels decoded with DCT scaling 1/2, 1/4, 1/8).
- downsamples: both use mean(w0 / w, h0 / h), compared to 1e-12 relative.
- mpp: equal to ``openslide.mpp-x/y`` when that is physically plausible (<= 50 µm/px); OpenSlide's
  72-dpi values (boxes.tiff: 352.8 µm/px) must come out as unknown (None).
- pixels: 50 random windows at level 0 and 50 at our coarsest level, compared after compositing
  OpenSlide's RGBA on white. Max abs difference <= 2 per channel for lossy tiles (two libjpeg-turbo
  builds), 0 for lossless ones. Window origins are level-0 points that map onto whole level pixels
  (x0 / downsample within 1/256 px of an integer): at other points OpenSlide resamples bilinearly
  by the sub-pixel remainder, which is not a reading difference.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from gpfm_engine.slide import open_slide
from gpfm_engine.slide.mpp import MAX_PLAUSIBLE_MPP

openslide = pytest.importorskip("openslide")

# Every file under wsi/ that OpenSlide 4.0.1 opens and reads (see data/SOURCES.md);
# test_every_openslide_slide_is_listed keeps this list complete.
REAL_SLIDES = [
    "aperio/CMU-1-Small-Region.svs",
    "aperio/small.svs",
    "hamamatsu-ndpi/test3-DAPI-2-(387).ndpi",
    "generic-tiff/boxes.tiff",
    "dicom/openslide-boxes/boxes_0.dcm",
    "dicom/openslide-boxes/boxes_1.dcm",
    "dicom/camelyon-ezwsi/multiframe_camelyon_challenge_image.dcm",
    "dicom/wsi2dcm-jpeg/jpeg.dicom",
    "dicom/wsi2dcm-jpeg2000/jpeg2000.dicom",
    "dicom/wsi2dcm-raw/raw.dicom",
    "dicom/highdicom-rgb/sm_image.dcm",
]
WINDOWS = 50
LOSSLESS = {"none", "lzw", "deflate"}


def osr_rgb(osr, location, level, size) -> np.ndarray:
    """OpenSlide's RGBA composited on white (what our read_region promises)."""
    rgba = np.asarray(osr.read_region(location, level, size)).astype(np.int32)
    alpha = rgba[..., 3:]
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def exact_origins(length: int, ds: float) -> np.ndarray:
    """Level pixels whose level-0 coordinate round(x * ds) maps back to x within 1/256 px."""
    xs = np.arange(length)
    return xs[np.abs(np.round(xs * ds) / ds - xs) < 1 / 256]


def compare_windows(slide, osr, level: int, tolerance: int, rng: np.random.Generator) -> None:
    ds = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    xs, ys = exact_origins(lw, ds), exact_origins(lh, ds)
    worst = 0
    for _ in range(WINDOWS):
        x, y = int(rng.choice(xs)), int(rng.choice(ys))
        w = int(rng.integers(1, min(256, lw) + 1))
        h = int(rng.integers(1, min(256, lh) + 1))
        location = (int(round(x * ds)), int(round(y * ds)))
        ours = slide.read_region(location, level, (w, h))
        worst = max(worst, int(np.abs(ours.astype(int) - osr_rgb(osr, location, level, (w, h))).max()))
    assert worst <= tolerance, f"level {level}: max abs difference {worst} > {tolerance}"


@pytest.mark.realdata
@pytest.mark.parametrize("name", REAL_SLIDES)
def test_real_slide_matches_openslide(shared_data, name):
    path = shared_data / "wsi" / name
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        props = osr.properties
        assert slide.vendor == props["openslide.vendor"]
        assert slide.dimensions == osr.dimensions
        n = slide.level_count
        assert n == osr.level_count
        assert slide.level_dimensions == osr.level_dimensions
        np.testing.assert_allclose(slide.level_downsamples, osr.level_downsamples, rtol=1e-12)
        os_mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])) if "openslide.mpp-x" in props else None
        if os_mpp and max(os_mpp) <= MAX_PLAUSIBLE_MPP:
            assert slide.mpp == pytest.approx(os_mpp, rel=1e-9)
        else:
            assert slide.mpp is None
        power = props.get("openslide.objective-power")
        assert slide.objective_power == (float(power) if power else None)
        assert set(slide.associated_images) == set(osr.associated_images)
        rng = np.random.default_rng(zlib.crc32(name.encode()))  # same windows every run
        for level in sorted({0, n - 1}):
            lossless = slide.backend == "openslide" or slide.tile_layout(level).compression in LOSSLESS
            compare_windows(slide, osr, level, 0 if lossless else 2, rng)
    osr.close()


@pytest.mark.realdata
def test_every_openslide_slide_is_listed(shared_data):
    root = shared_data / "wsi"
    opened = set()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "negative" not in p.parts):
        try:
            with openslide.OpenSlide(str(path)) as osr:
                osr.read_region((0, 0), 0, (1, 1))
        except openslide.OpenSlideError:
            continue
        opened.add(path.relative_to(root).as_posix())
    assert opened <= set(REAL_SLIDES), f"add to REAL_SLIDES: {sorted(opened - set(REAL_SLIDES))}"


@pytest.mark.realdata
def test_real_aperio_pixel_and_fast_path(shared_data):
    """libvips asserts pixel (10, 10) of CMU-1-Small-Region = (244, 250, 243); NDPI and SVS use tiff."""
    with open_slide(shared_data / "wsi/aperio/CMU-1-Small-Region.svs") as slide:
        assert slide.backend == "tiff"
        assert tuple(slide.read_region((10, 10), 0, (1, 1))[0, 0]) == (244, 250, 243)
        assert slide.tile_layout(0) == (240, 240, 10, 13, "jpeg")
    with open_slide(shared_data / "wsi/hamamatsu-ndpi/test3-DAPI-2-(387).ndpi") as slide:
        assert slide.backend == "tiff" and slide.tile_layout(0)[:4] == (3968, 8, 1, 608)


@pytest.mark.realdata
def test_real_ndpi_reduced_levels_are_tiled_like_openslide(shared_data):
    """The reduced levels read the smallest stored level's tiles at 1/2, 1/4, 1/8 (OpenSlide's tile
    sizes); their ``jpeg/N`` compression keeps full-size-only (GPU) decoders off them."""
    path = shared_data / "wsi/hamamatsu-ndpi/test3-DAPI-2-(387).ndpi"
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        assert slide.tile_layout(3) == (496, 8, 1, 76, "jpeg")
        for level, denom in ((4, 2), (5, 4), (6, 8)):
            layout = slide.tile_layout(level)
            assert layout == (496 // denom, 8 // denom, 1, 76, f"jpeg/{denom}")
            props = osr.properties
            assert (layout.tile_width, layout.tile_height) == (int(props[f"openslide.level[{level}].tile-width"]),
                                                               int(props[f"openslide.level[{level}].tile-height"]))
            assert slide.read_raw_tiles(level, [7]) == slide.read_raw_tiles(3, [7])  # full-size streams
            picks = [0, 37, 75]
            for index, tile in zip(picks, slide.read_tiles(level, picks)):
                x, y = layout.origin(index)
                ds = slide.level_downsamples[level]
                ref = osr_rgb(osr, (round(x * ds), round(y * ds)), level, (layout.tile_width, layout.tile_height))
                assert tile.shape == ref.shape and np.abs(tile.astype(int) - ref).max() <= 2
    osr.close()


# -- synthesized slides through both backends ------------------------------------------------------


@pytest.fixture(scope="module")
def svs(slide_factory) -> Path:
    return slide_factory(size=(700, 530), fmt="svs", compression="jpeg", tile=128, downsample=2, associated=False)


def test_backends_agree_on_synthesized_svs(svs):
    rng = np.random.default_rng(4)
    with open_slide(svs, backend="tiff") as fast, open_slide(svs, backend="openslide") as slow:
        assert (fast.backend, slow.backend) == ("tiff", "openslide")
        assert fast.level_dimensions == slow.level_dimensions
        np.testing.assert_allclose(fast.level_downsamples, slow.level_downsamples, rtol=1e-12)
        assert fast.mpp == slow.mpp == (0.25, 0.25) and fast.objective_power == slow.objective_power == 40
        for level in range(fast.level_count):
            compare_windows(fast, slow._osr, level, 2, rng)
            layout = slow.tile_layout(level)
            assert layout[:4] == fast.tile_layout(level)[:4] and layout.compression == "openslide"
            picks = [0, layout.count - 1]
            for a, b in zip(fast.read_tiles(level, picks), slow.read_tiles(level, picks)):
                assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 2


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_mpp_override_honoured_by_every_backend(svs, backend):
    with open_slide(svs, backend=backend, mpp=0.5) as slide:
        assert slide.mpp == (0.5, 0.5) and slide.mpp_source == "override"
        (w0, h0), (w1, h1) = slide.level_dimensions[:2]
        assert slide.level_mpp(1) == pytest.approx((0.5 * w0 / w1, 0.5 * h0 / h1))
        region = slide.read_region((256, 256), 1, (64, 64))
        assert region.shape == (64, 64, 3) and region.flags.writeable and region.flags.c_contiguous
    with pytest.raises(ValueError, match="mpp"):
        open_slide(svs, backend=backend, mpp=-1.0)


def test_openslide_backend_has_no_raw_streams(svs):
    from gpfm_engine.errors import SlideError

    with open_slide(svs, backend="openslide") as slide, pytest.raises(SlideError, match="raw tile"):
        slide.read_raw_tiles(0, [0])
