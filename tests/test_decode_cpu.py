"""CPU tile decoders against independent references (OpenCV, PIL, the encoder's input).

Tolerances: lossless codecs 0; JPEG vs OpenCV's libjpeg-turbo <= 2 per channel (IDCT/upsampling
rounding of two builds), also for DCT-scaled decodes (OpenCV's IMREAD_REDUCED_*); JPEG vs its source
within the codec's loss; alpha compositing vs PIL <= 1.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import imagecodecs
import numpy as np
import pytest
from PIL import Image

from gpfm_engine.decode import COMPRESSIONS, StreamDecodeError, decode, decode_map, to_rgb
from gpfm_engine.synth import TissuePattern


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """Tissue-like RGB content (smooth + grain), 96 x 80, never constant."""
    return TissuePattern(80, 96, mpp=1.0, seed=5, coverage=0.9).render(0, 0, 80, 96)


def test_jpeg_matches_opencv(image):
    stream = imagecodecs.jpeg8_encode(image, level=85)
    (ours,) = decode([stream], "jpeg")
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(stream, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert ours.shape == image.shape and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref).max() <= 2
    assert np.abs(ours.astype(int) - image).mean() < 3  # right colours, within JPEG loss


REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


@pytest.mark.parametrize("denom", [2, 4, 8])
@pytest.mark.parametrize("subsampling", ["444", "420"])
def test_scaled_jpeg_matches_opencv_reduced_decode(image, denom, subsampling):
    stream = imagecodecs.jpeg8_encode(image, level=85, subsampling=subsampling)
    (ours,) = decode([stream], f"jpeg/{denom}")
    ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(stream, np.uint8), REDUCED[denom]), cv2.COLOR_BGR2RGB)
    assert ours.shape == (96 // denom, 80 // denom, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - ref).max() <= 2
    box = image.reshape(96 // denom, denom, 80 // denom, denom, 3).mean(axis=(1, 3))
    assert np.abs(ours - box).mean() < 4  # the area average of the source, within JPEG loss


def test_scaled_jpeg_rejects_corrupt_streams(image):
    stream = imagecodecs.jpeg8_encode(image, level=85)
    sof, dht = stream.find(b"\xff\xc0"), stream.find(b"\xff\xc4")
    bad_components = stream[: sof + 9] + b"\x07" + stream[sof + 10 :]
    bad_table = stream[: dht + 4] + b"\x55" + stream[dht + 5 :]
    for bad, cause in ((stream[: len(stream) // 2], "truncated"), (b"\xff\xd8\xff\xd9", "corrupt JPEG header"),
                       (bad_components, "unreadable JPEG header"), (bad_table, "jpeg decoder: OSError")):
        with pytest.raises(StreamDecodeError, match=cause):
            decode([bad], "jpeg/2")


def test_grey_jpeg_becomes_rgb(image):
    grey = image[..., 1].copy()
    (ours,) = decode([imagecodecs.jpeg8_encode(grey, level=95)], "jpeg")
    assert ours.shape == (*grey.shape, 3)
    assert (ours[..., 0] == ours[..., 2]).all()
    assert np.abs(ours[..., 0].astype(int) - grey).max() <= 8


def test_jpeg2000_lossless_exact(image):
    (ours,) = decode([imagecodecs.jpeg2k_encode(image, level=0, codecformat="j2k")], "jpeg2000")
    np.testing.assert_array_equal(ours, image)


def test_jpeg2000_ycbcr_converted(image):
    """Aperio 33003: YCbCr samples coded without colour transform; we convert (JFIF equations)."""
    rgb = image.astype(np.float64)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    ycc = np.stack([y, (rgb[..., 2] - y) / 1.772 + 128, (rgb[..., 0] - y) / 1.402 + 128], axis=-1)
    ycc8 = np.clip(np.rint(ycc), 0, 255).astype(np.uint8)
    stream = imagecodecs.jpeg2k_encode(ycc8, level=0, codecformat="j2k", mct=False)
    (ours,) = decode([stream], "jpeg2000_ycbcr")
    assert np.abs(ours.astype(int) - image).max() <= 2  # YCbCr quantization to 8 bits


@pytest.mark.parametrize("compression", ["lzw", "deflate", "none"])
@pytest.mark.parametrize("predictor", [1, 2])
def test_raw_codecs_exact(image, compression, predictor):
    stored = image if predictor == 1 else np.diff(image, axis=1, prepend=np.zeros_like(image[:, :1]))
    data = stored.astype(np.uint8).tobytes()
    stream = {"lzw": imagecodecs.lzw_encode, "deflate": imagecodecs.zlib_encode, "none": bytes}[compression](data)
    (ours,) = decode([stream], compression, shape=image.shape, predictor=predictor)
    np.testing.assert_array_equal(ours, image)


def test_short_last_strip_accepted(image):
    (ours,) = decode([image[:37].tobytes()], "none", shape=image.shape)
    np.testing.assert_array_equal(ours, image[:37])


def test_to_rgb_composites_alpha_on_white_like_pil():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    white = Image.new("RGBA", (30, 20), (255, 255, 255, 255))
    ref = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    assert np.abs(to_rgb(rgba).astype(int) - ref).max() <= 1
    grey_alpha = rgba[..., 2:]
    out = to_rgb(grey_alpha)
    assert out.shape == (20, 30, 3) and (out[..., 0] == out[..., 1]).all()
    assert (to_rgb(np.zeros((2, 2, 4), np.uint8)) == 255).all()  # transparent = white glass


def test_decode_map_equals_serial_and_maps_error_positions(image):
    tiles = [np.roll(image, k, axis=1) for k in range(11)]
    streams = [imagecodecs.jpeg8_encode(t, level=80) for t in tiles]
    with ThreadPoolExecutor(2) as pool:
        parallel = decode_map(pool, streams, "jpeg", chunks=4)
        assert all((a == b).all() for a, b in zip(parallel, decode(streams, "jpeg")))
        streams[9] = streams[9][: len(streams[9]) // 2]
        with pytest.raises(StreamDecodeError) as info:
            decode_map(pool, streams, "jpeg", chunks=4)
    assert info.value.position == 9


@pytest.mark.parametrize(
    "damage, cause",
    [
        (lambda s: s[: len(s) // 2], "truncated"),
        (lambda s: s[:-2], "truncated"),
        (lambda s: b"\x00" * 8 + s[8:], "no SOI"),
        (lambda s: s[:-300] + b"\xff\xe1\x00" + s[-297:], "corrupt JPEG scan"),
        (lambda s: b"", "empty"),
    ],
)
def test_corrupt_jpeg_is_an_error_not_pixels(image, damage, cause):
    stream = imagecodecs.jpeg8_encode(image, level=90)
    with pytest.raises(StreamDecodeError, match=cause):
        decode([damage(stream)], "jpeg")


@pytest.mark.parametrize("compression, stream", [("deflate", b"\x78\x9c garbage"), ("lzw", b"\x80\x00\x20"),
                                                 ("jpeg2000", b"\xff\x4f\xff\x51\x00"), ("none", b"\x01\x02")])
def test_corrupt_other_codecs(compression, stream):
    with pytest.raises(StreamDecodeError):
        decode([stream], compression, shape=(8, 8, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown compression"):
        decode([b""], "webp")
    with pytest.raises(ValueError, match="needs the tile shape"):
        decode([b""], "lzw")
    assert set(COMPRESSIONS) == {"jpeg", "jpeg/2", "jpeg/4", "jpeg/8", "jpeg2000", "jpeg2000_ycbcr", "lzw", "deflate",
                                 "none"}


def test_scaled_jpeg_is_never_claimed_by_a_gpu_decoder():
    """GPU plug-ins decode at full size only: a ``jpeg/N`` level must reach the CPU decoder (the
    pipeline hands a level to a GPU decoder only when its compression is in ``compressions``)."""
    from gpfm_engine.decode.cpu import SCALED_JPEG
    from gpfm_engine.decode.gpu import GPU_DECODERS, decoder_class

    for name in GPU_DECODERS:
        assert not set(SCALED_JPEG) & decoder_class(name).compressions, name
