"""Bad input: each failure is one SlideError / TileDecodeError line naming the file and the cause.

Never a crash, a hang, or garbage returned as pixels.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gpfm_engine import synth
from gpfm_engine.errors import SlideError, TileDecodeError
from gpfm_engine.slide import open_slide


def assert_one_line(exc: Exception, path: Path, *causes: str) -> None:
    text = str(exc)
    assert "\n" not in text and text.startswith(str(path)), text
    for cause in causes:
        assert cause in text, text


@pytest.fixture(scope="module")
def svs_bytes(slide_factory) -> bytes:
    path = slide_factory(size=(600, 450), fmt="svs", compression="jpeg", tile=128, downsample=2)
    return path.read_bytes()


def test_missing_empty_directory(tmp_path):
    for path, cause in [(tmp_path / "nope.svs", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(SlideError) as info:
            open_slide(path)
        assert_one_line(info.value, path, cause)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    for backend in (None, "tiff", "openslide"):
        with pytest.raises(SlideError) as info:
            open_slide(empty, backend=backend)
        assert_one_line(info.value, empty, "empty file")


def test_not_a_slide(tmp_path):
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n" * 20)
    png = tmp_path / "picture.tif"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png.with_suffix(".png"))
    png.write_bytes(png.with_suffix(".png").read_bytes())  # PNG bytes behind a .tif name
    for path in (text, png):
        with pytest.raises(SlideError) as info:
            open_slide(path)
        assert_one_line(info.value, path, "not a supported slide")
    with pytest.raises(SlideError) as info:
        open_slide(text, backend="tiff")
    assert_one_line(info.value, text, "not a readable TIFF")


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.97])
def test_truncated_file(tmp_path, svs_bytes, fraction):
    path = tmp_path / "cut.svs"
    path.write_bytes(svs_bytes[: int(len(svs_bytes) * fraction)])
    with pytest.raises(SlideError) as info:
        open_slide(path)
    assert_one_line(info.value, path, "truncated")


def test_unsupported_compression(tmp_path):
    """Refused by the fast path: OpenSlide takes over if it can (zstd), else both causes are named."""
    zstd = tmp_path / "zstd.tif"
    tifffile.imwrite(zstd, np.full((64, 64, 3), 200, np.uint8), tile=(32, 32), compression="zstd")
    with pytest.raises(SlideError) as info:
        open_slide(zstd, backend="tiff")
    assert_one_line(info.value, zstd, "unsupported TIFF compression 50000")
    with open_slide(zstd) as slide:
        assert slide.backend == "openslide" and (slide.read_region((0, 0), 0, (8, 8)) == 200).all()
    unknown = tmp_path / "unknown.tif"
    tifffile.imwrite(unknown, np.full((64, 64, 3), 200, np.uint8), tile=(32, 32))
    with tifffile.TiffFile(unknown, mode="r+b") as tf:
        tf.pages[0].tags["Compression"].overwrite(52479)
    with pytest.raises(SlideError) as info:
        open_slide(unknown)
    assert_one_line(info.value, unknown, "unsupported TIFF compression 52479", "OpenSlide fallback")


def test_not_an_rgb_image(tmp_path):
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), tile=(32, 32))
    with pytest.raises(SlideError) as info:
        open_slide(path, backend="tiff")
    assert_one_line(info.value, path, "16-bit")


def _corrupt_tile(src: bytes, dst: Path, page: int, tile: int, how: str) -> None:
    data = bytearray(src)
    dst.write_bytes(data)
    with tifffile.TiffFile(dst) as tf:
        offset, count = tf.pages[page].dataoffsets[tile], tf.pages[page].databytecounts[tile]
    if how == "garbage":
        data[offset + count // 3 : offset + count - 2] = np.random.default_rng(0).integers(
            0, 256, count - 2 - count // 3, dtype=np.uint8).tobytes()
    elif how == "zeros":
        data[offset + count // 2 : offset + count] = bytes(count - count // 2)
    else:  # header destroyed
        data[offset : offset + 8] = bytes(8)
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["garbage", "zeros", "header"])
def test_corrupt_tile_names_level_and_index(tmp_path, svs_bytes, how):
    path = tmp_path / f"corrupt-{how}.svs"
    _corrupt_tile(svs_bytes, path, page=2, tile=3, how=how)  # svs page 2 = pyramid level 1
    with open_slide(path) as slide:
        with pytest.raises(TileDecodeError) as info:
            slide.read_tiles(1, [0, 1, 2, 3])
        assert (info.value.level, info.value.index) == (1, 3)
        assert_one_line(info.value, path, "level 1 tile 3")
        with ThreadPoolExecutor(2) as pool, pytest.raises(TileDecodeError) as info:
            slide.read_tiles(1, range(slide.tile_layout(1).count), executor=pool)  # spread over chunks
        assert (info.value.level, info.value.index) == (1, 3)
        with pytest.raises(TileDecodeError):
            x, y = slide.tile_layout(1).origin(3)
            slide.read_region((2 * x, 2 * y), 1, (64, 64))
        assert slide.read_tiles(1, [0, 1, 2])[0].shape == (128, 128, 3)  # the rest still reads
        assert slide.read_region((0, 0), 0, (600, 450)).shape == (450, 600, 3)


def test_corrupt_lossless_tile(tmp_path, slide_factory):
    src = slide_factory(size=(300, 200), fmt="tiff", compression="deflate", tile=128, associated=False)
    path = tmp_path / "corrupt.tif"
    _corrupt_tile(src.read_bytes(), path, page=0, tile=1, how="garbage")
    with open_slide(path) as slide, pytest.raises(TileDecodeError) as info:
        slide.read_region((0, 0), 0, (300, 200))
    assert_one_line(info.value, path, "level 0 tile 1", "deflate")


@pytest.mark.realdata
def test_negative_real_files(shared_data):
    negative = shared_data / "wsi" / "negative"
    for name, cause in [("broken.svs", "not a supported slide"), ("unopenable.tiff", "compression 52479")]:
        with pytest.raises(SlideError) as info:
            open_slide(negative / name)
        assert_one_line(info.value, negative / name, cause)
    path = negative / "unreadable.svs"  # opens (16 x 16 Aperio), but its JPEG data is corrupt
    with open_slide(path) as slide:
        with pytest.raises(TileDecodeError) as info:
            slide.read_region((0, 0), 0, (16, 16))
        assert_one_line(info.value, path, "level 0 tile 0")
        with pytest.raises(SlideError) as info:
            slide.associated_images["thumbnail"]
        assert_one_line(info.value, path, "thumbnail")


@pytest.mark.realdata
def test_unsupported_real_formats(shared_data):
    wsi = shared_data / "wsi"
    for name in ["olympus-vsi/vsi-ets-test-jpg2k.vsi", "qptiff/small_vectra.qptiff",
                 "other-ome-tiff/multi-channel-z-series.ome.tif", "dicom/highdicom-gray16/sm_image_grayscale.dcm",
                 "dicom/highdicom-jpegls/sm_image_jpegls.dcm", "dicom/pathml/small_dicom.dcm"]:
        with pytest.raises(SlideError) as info:
            open_slide(wsi / name)
        assert_one_line(info.value, wsi / name)
    with open_slide(wsi / "flat-tiff/kidney-48-5.tif") as slide:  # flat stripped TIFF: one strip, one level
        assert slide.backend == "tiff" and slide.dimensions == (1493, 901) and slide.mpp is None
        assert slide.read_region((1400, 850), 0, (200, 100))[60:, 100:].min() == 255


def test_synth_factory_formats_are_all_readable():
    assert set(synth.FORMATS) == {"svs", "tiff", "bigtiff", "ome"}  # test_slide_tiff covers each


def test_missing_openslide_names_the_extra(monkeypatch, tmp_path, slide_factory):
    import sys

    from gpfm_engine.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide now raises ImportError
    dicom_like = tmp_path / "slide.dcm"
    dicom_like.write_bytes(b"\x00" * 128 + b"DICM")
    with pytest.raises(MissingExtraError, match=r"gpfm-engine\[openslide\]"):
        open_slide(dicom_like)
    with open_slide(slide_factory(size=(300, 200), fmt="tiff", compression="lzw", tile=128)) as slide:
        assert slide.backend == "tiff"  # the fast path does not need OpenSlide
