"""JPEGTables splice, Aperio RGB colour fix and NDPI restart intervals, checked with two decoders.

References: the complete stream the encoder wrote (decoded by libjpeg-turbo, bit-identical after
splicing) and OpenCV's decoder (so the fix works for "any standard decoder", not just ours).
"""
from __future__ import annotations

import cv2
import imagecodecs
import numpy as np
import pytest

from gpfm_engine import synth
from gpfm_engine.decode import decode
from gpfm_engine.slide.jpeg import (APP14_RGB, JpegTileFixer, declares_colour_space, iter_segments,
                                    rename_rgb_components, restart_interval_to_stream)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synth.TissuePattern(64, 64, mpp=1.0, seed=2, coverage=0.9).render(0, 0, 64, 64)


def _opencv_rgb(stream: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(stream, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_splice_rule_gives_bit_identical_decode(image):
    full = imagecodecs.jpeg8_encode(image, level=90, outcolorspace="ycbcr", subsampling=(2, 2))
    tables, tile = synth.split_jpeg_tables(full)
    stream = JpegTileFixer(tables, rgb=False)(tile)
    assert stream == tables[:-2] + tile[2:]
    np.testing.assert_array_equal(decode([stream], "jpeg")[0], imagecodecs.jpeg8_decode(full))
    with pytest.raises(Exception):  # the abbreviated tile alone is not decodable
        imagecodecs.jpeg8_decode(tile)


def _aperio_tile(image: np.ndarray) -> tuple[bytes, bytes]:
    """(tables, tile) as Aperio writes RGB tiles: no APP14/JFIF, component ids 0, 1, 2."""
    full = imagecodecs.jpeg8_encode(image, level=90, outcolorspace="rgb")
    tables, tile = synth.split_jpeg_tables(full)
    return tables, synth._aperio_component_ids(tile)


def test_aperio_rgb_fix_gives_right_colours_in_two_decoders(image):
    tables, tile = _aperio_tile(image)
    naive = tables[:-2] + tile[2:]
    fixed = JpegTileFixer(tables, rgb=True)(tile)
    truth = imagecodecs.jpeg8_decode(naive, colorspace="RGB", outcolorspace="RGB")  # decoder told the space
    assert np.abs(imagecodecs.jpeg8_decode(naive).astype(int) - image).max() > 50  # the bug being fixed
    np.testing.assert_array_equal(decode([fixed], "jpeg")[0], truth)
    np.testing.assert_array_equal(_opencv_rgb(fixed), truth)
    assert np.abs(truth.astype(int) - image).mean() < 3


def test_fixed_stream_carries_app14_and_rgb_ids(image):
    tables, tile = _aperio_tile(image)
    fixed = JpegTileFixer(tables, rgb=True)(tile)
    assert fixed[2 : 2 + len(APP14_RGB)] == APP14_RGB
    segments = {marker: (start, end) for marker, start, end in iter_segments(fixed)}
    sof, sos = segments[0xC0][0], segments[0xDA][0]
    assert [fixed[sof + 10 + 3 * i] for i in range(3)] == list(b"RGB")
    assert [fixed[sos + 5 + 2 * i] for i in range(3)] == list(b"RGB")
    assert declares_colour_space(fixed)


def test_streams_that_declare_their_colour_space_are_left_alone(image):
    jfif = imagecodecs.jpeg8_encode(image, level=90)  # a self-contained YCbCr stream with JFIF APP0
    assert declares_colour_space(jfif)
    assert JpegTileFixer(None, rgb=True)(jfif) == jfif
    tables, _ = synth.split_jpeg_tables(jfif)
    assert rename_rgb_components(tables) == tables  # no SOF/SOS to touch


def test_missing_and_foreign_tiles_pass_through():
    fixer = JpegTileFixer(None, rgb=True)
    assert fixer(b"") == b""
    assert fixer(b"\x00\x01garbage") == b"\x00\x01garbage"


def test_restart_interval_becomes_a_complete_stream():
    header = b"\xff\xd8HEADER"
    assert restart_interval_to_stream(header, b"scan\xff\xd3") == header + b"scan\xff\xd9"
    assert restart_interval_to_stream(header, b"scan\xff\xd9") == header + b"scan\xff\xd9"
    assert restart_interval_to_stream(header, b"scan") == header + b"scan\xff\xd9"


def test_synthesized_aperio_rgb_slide_colours(slide_factory):
    """End to end on a slide written the Aperio way: tiles read and decoded match the source."""
    from gpfm_engine.slide import open_slide

    source = synth.TissuePattern(300, 200, mpp=1.0, seed=9, coverage=0.9).render(0, 0, 300, 200)
    path = slide_factory(fmt="svs", compression="jpeg_rgb", tile=128, image=source, associated=False)
    with open_slide(path) as slide:
        layout = slide.tile_layout(0)
        raw = slide.read_raw_tiles(0, range(layout.count))
        region = slide.read_region((0, 0), 0, (300, 200))
    assert np.abs(region.astype(int) - source).mean() < 3
    tile0 = _opencv_rgb(raw[0])
    assert np.abs(tile0.astype(int) - source[:128, :128]).mean() < 3
