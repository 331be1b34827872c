"""CPU decoding of self-contained tile streams into RGB uint8 arrays.

Codecs come from imagecodecs (libjpeg-turbo, OpenJPEG, zlib, LZW), and from Pillow's
libjpeg-turbo for reduced-size JPEG decodes (``jpeg/N``, which imagecodecs cannot do); every codec
call releases the GIL, so callers get real parallelism by mapping :func:`decode` over their own
thread pool (:func:`decode_map`). This module starts no threads of its own.

A stream that cannot be decoded raises :class:`StreamDecodeError` carrying its position in the
batch; the slide layer turns that into a ``TileDecodeError`` naming the file, level and tile.
libjpeg-turbo only *warns* on truncated or corrupt entropy-coded data and returns grey filler,
so JPEG streams are checked for a complete, well-formed scan first: garbage must never come back
as pixels.
"""
from __future__ import annotations

import io
import re
from concurrent.futures import Executor
from typing import Sequence

import imagecodecs
import numpy as np
from PIL import Image

from gpfm_engine.errors import exception_summary

# JPEG streams decoded at reduced size by libjpeg's DCT scaling (scale_denom 2, 4, 8): the levels
# OpenSlide adds to Hamamatsu slides. ``"jpeg/N"`` names full-size JPEG streams decoded at 1/N.
SCALED_JPEG: dict[str, int] = {"jpeg/2": 2, "jpeg/4": 4, "jpeg/8": 8}
# The compression names of ``TileLayout.compression`` that this module decodes.
# ``jpeg2000_ycbcr`` is Aperio 33003: YCbCr samples coded without a colour transform.
COMPRESSIONS: tuple[str, ...] = ("jpeg", *SCALED_JPEG, "jpeg2000", "jpeg2000_ycbcr", "lzw", "deflate", "none")
# Codecs whose streams carry no image header: the caller passes the stored tile shape.
RAW_COMPRESSIONS = frozenset({"lzw", "deflate", "none"})


class StreamDecodeError(ValueError):
    """Stream ``position`` of a :func:`decode` batch is corrupt or not what the codec expects."""

    def __init__(self, position: int, cause: str) -> None:
        self.position = position
        self.cause = cause
        super().__init__(f"stream {position}: {cause}")


def decode(
    streams: Sequence[bytes],
    compression: str,
    *,
    shape: tuple[int, int, int] | None = None,
    predictor: int = 1,
) -> list[np.ndarray]:
    """Decode each stream into an RGB uint8 array ``[h, w, 3]``.

    ``shape`` (tile height, width, samples per pixel) is required for the header-less codecs
    (lzw, deflate, none); a shorter stream that holds whole rows is accepted (the last strip of a
    stripped TIFF). ``predictor`` 2 undoes TIFF horizontal differencing. Grey, grey+alpha and RGBA
    samples are converted to RGB with alpha composited on white.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; choose from {COMPRESSIONS}")
    if compression in RAW_COMPRESSIONS and shape is None:
        raise ValueError(f"compression {compression!r} needs the tile shape")
    out = []
    for position, stream in enumerate(streams):
        try:
            out.append(to_rgb(_decode_one(stream, compression, shape, predictor)))
        except StreamDecodeError as exc:
            raise StreamDecodeError(position, exc.cause) from None
        except (MemoryError, ValueError, RuntimeError) as exc:
            raise StreamDecodeError(position, f"{compression} decoder: {exception_summary(exc)}") from exc
    return out


def decode_map(
    executor: Executor | None,
    streams: Sequence[bytes],
    compression: str,
    *,
    chunks: int = 8,
    **kwargs,
) -> list[np.ndarray]:
    """:func:`decode` spread over a caller-owned ``executor`` in about ``chunks`` pieces.

    Chunking keeps per-task overhead small for tiny tiles; positions in a raised
    :class:`StreamDecodeError` refer to the whole ``streams`` sequence. ``executor=None`` decodes
    in the calling thread.
    """
    n = len(streams)
    if executor is None or n < 2:
        return decode(streams, compression, **kwargs)
    step = max(1, -(-n // max(1, chunks)))
    starts = list(range(0, n, step))
    futures = [executor.submit(decode, streams[s : s + step], compression, **kwargs) for s in starts]
    out: list[np.ndarray] = []
    for start, fut in zip(starts, futures):
        try:
            out.extend(fut.result())
        except StreamDecodeError as exc:
            for other in futures:
                other.cancel()
            raise StreamDecodeError(start + exc.position, exc.cause) from None
    return out


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` from grey ``[h, w]``/``[h, w, 1]``, grey+alpha, RGB or RGBA.

    Alpha is treated as unassociated (TIFF ExtraSamples=2, OpenSlide's RGBA output) and
    composited on white, so transparent areas read as background glass.
    """
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected 8-bit samples, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    if channels == 3:
        return pixels
    if channels == 1:
        return np.repeat(pixels, 3, axis=2)
    if channels in (2, 4):
        colour = pixels[..., :-1].astype(np.uint16)
        alpha = pixels[..., -1:].astype(np.uint16)
        blended = (colour * alpha + 255 * (255 - alpha) + 127) // 255
        rgb = blended.astype(np.uint8)
        return rgb if channels == 4 else np.repeat(rgb, 3, axis=2)
    raise ValueError(f"cannot make RGB from {channels} samples per pixel")


def _decode_one(stream: bytes, compression: str, shape: tuple[int, int, int] | None, predictor: int) -> np.ndarray:
    if not stream:
        raise StreamDecodeError(0, "empty stream")
    if compression == "jpeg":
        _check_jpeg(stream)
        return imagecodecs.jpeg8_decode(stream)
    if compression in SCALED_JPEG:
        _check_jpeg(stream)
        return _jpeg_decode_scaled(stream, SCALED_JPEG[compression])
    if compression in ("jpeg2000", "jpeg2000_ycbcr"):
        pixels = imagecodecs.jpeg2k_decode(stream)
        return _ycbcr_to_rgb(pixels) if compression == "jpeg2000_ycbcr" else pixels
    assert shape is not None
    if compression == "lzw":
        data = imagecodecs.lzw_decode(stream)
    elif compression == "deflate":
        data = imagecodecs.zlib_decode(stream)
    else:
        data = stream
    return _raw_pixels(data, shape, predictor)


def _jpeg_decode_scaled(stream: bytes, denom: int) -> np.ndarray:
    """Decode at 1/``denom`` size inside libjpeg-turbo (reduced IDCT, no resampling afterwards).

    imagecodecs exposes no ``scale_denom``; Pillow's ``draft`` sets it (and nothing else: the
    IDCT method and fancy upsampling stay libjpeg's defaults, as in OpenSlide), so the pixels
    are the ones OpenSlide's Hamamatsu driver produces for its reduced levels.
    """
    try:
        with Image.open(io.BytesIO(stream), formats=("JPEG",)) as image:
            width, height = image.size
            image.draft(None, (max(1, width // denom), max(1, height // denom)))
            expected = (-(-width // denom), -(-height // denom))
            if image.size != expected or image.mode not in ("L", "RGB"):
                raise StreamDecodeError(0, f"cannot decode a {width}x{height} px {image.mode} JPEG at 1/{denom} scale")
            return np.asarray(image)
    except Image.UnidentifiedImageError:
        raise StreamDecodeError(0, "jpeg decoder: unreadable JPEG header") from None
    except (OSError, SyntaxError) as exc:  # Pillow's errors for broken JPEG data
        raise StreamDecodeError(0, f"jpeg decoder: {exception_summary(exc)}") from exc


def _raw_pixels(data: bytes, shape: tuple[int, int, int], predictor: int) -> np.ndarray:
    """Reshape decompressed bytes to ``[rows, w, s]``; fewer whole rows is a short last strip."""
    height, width, samples = shape
    row = width * samples
    full = height * row
    if len(data) >= full:
        pixels = np.frombuffer(data, np.uint8, count=full).reshape(height, width, samples)
    elif len(data) % row == 0:
        pixels = np.frombuffer(data, np.uint8).reshape(-1, width, samples)
    else:
        raise StreamDecodeError(0, f"decompressed {len(data)} bytes, expected {full} ({height}x{width}x{samples})")
    if predictor == 2:
        pixels = np.cumsum(pixels, axis=1, dtype=np.uint8)
    elif predictor != 1:
        raise StreamDecodeError(0, f"unsupported TIFF predictor {predictor}")
    return pixels


def _ycbcr_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr to RGB (the JFIF equations), rounded to nearest."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise StreamDecodeError(0, f"expected 3 YCbCr components, got shape {pixels.shape}")
    y = pixels[..., 0].astype(np.float32)
    cb = pixels[..., 1].astype(np.float32) - 128.0
    cr = pixels[..., 2].astype(np.float32) - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# A 0xFF inside the entropy-coded data followed by anything but stuffing (00), a fill byte (FF),
# a restart marker (D0-D7) or the table/scan markers between the scans of a progressive JPEG
# (DHT, DAC, SOS, DQT, DRI) is a foreign marker. One regex pass finds the first at C speed.
_FOREIGN_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7\xc4\xcc\xda\xdb\xdd]")


def _check_jpeg(stream: bytes) -> None:
    """Reject streams libjpeg-turbo would 'decode' with only a warning: no SOI, no scan, no EOI,
    or a foreign marker inside the scan (truncated or spliced-in garbage).

    Bit errors that keep the entropy-coded data well-formed cannot be detected by any decoder.
    """
    if stream[:2] != b"\xff\xd8":
        raise StreamDecodeError(0, "not a JPEG stream (no SOI marker)")
    end = len(stream)
    while end > 2 and stream[end - 1] == 0:  # some writers pad tiles with zero bytes
        end -= 1
    if stream[end - 2 : end] != b"\xff\xd9":
        raise StreamDecodeError(0, "JPEG stream truncated (no EOI marker)")
    pos = 2
    while True:  # walk the header segments to the start of the scan
        if pos + 4 > end or stream[pos] != 0xFF:
            raise StreamDecodeError(0, f"corrupt JPEG header at byte {pos}")
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scan_start = pos + 2 + length
            break
        if marker == 0xD9 or length < 2:
            raise StreamDecodeError(0, "JPEG stream has no scan")
        pos += 2 + length
    foreign = _FOREIGN_MARKER.search(stream, scan_start, end - 2)
    if foreign is not None:
        bad = foreign.start()
        raise StreamDecodeError(0, f"corrupt JPEG scan data (marker 0xFF{stream[bad + 1]:02X} at byte {bad})")
