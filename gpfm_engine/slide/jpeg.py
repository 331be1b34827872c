"""Turn JPEG tiles as TIFF stores them into self-contained streams any decoder gets right.

Three stored forms occur in slides:
- abbreviated tiles (SOI, SOF, SOS, scan, EOI) whose quantization and Huffman tables sit once per
  page in the JPEGTables tag: splice ``tables[:-2] + tile[2:]`` (TIFF Technical Note 2);
- Aperio RGB tiles: photometric RGB, but no JFIF/Adobe marker and component ids 0,1,2, so every
  default decoder (libjpeg, nvJPEG, DALI) assumes YCbCr and returns false colours. Insert an Adobe
  APP14 marker with transform=0 and rename the component ids to 'R','G','B' (both, because
  decoders differ in which one they honour);
- NDPI restart intervals: one JPEG per level whose restart intervals tifffile exposes as tiles,
  with a rewritten header giving the interval's size; the interval ends with an RSTn marker,
  which becomes EOI.
Each level builds one :class:`JpegTileFixer`, so the per-tile cost is a few byte copies.
"""
from __future__ import annotations

from typing import Iterator

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# APP14 "Adobe", version 100, flags 0, 0, transform 0 (= components are not YCbCr)
APP14_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x80\x00\x00\x00\x00"
RGB_IDS = b"RGB"
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def iter_segments(stream: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each header segment after SOI, up to and including SOS.

    Stops early (without raising) on a malformed header: the decoder reports that case.
    """
    pos = 2
    n = len(stream)
    while pos + 4 <= n:
        if stream[pos] != 0xFF:
            return
        marker = stream[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            return
        end = pos + 2 + int.from_bytes(stream[pos + 2 : pos + 4], "big")
        yield marker, pos, end
        if marker == 0xDA:
            return
        pos = end


def _is_colour_declaration(stream: bytes, marker: int, start: int) -> bool:
    """Segment at ``start`` is a JFIF APP0 or Adobe APP14: it tells decoders the colour space."""
    return ((marker == 0xE0 and stream[start + 4 : start + 8] == b"JFIF")
            or (marker == 0xEE and stream[start + 4 : start + 9] == b"Adobe"))


def declares_colour_space(stream: bytes) -> bool:
    """True when a JFIF APP0 or Adobe APP14 segment already tells decoders the colour space."""
    return any(_is_colour_declaration(stream, marker, start) for marker, start, _ in iter_segments(stream))


def _id_offsets(stream: bytes, marker: int, start: int) -> tuple[int, ...]:
    """Offsets of the component ids in a 3-component SOF or SOS segment at ``start`` (else none)."""
    if marker in _SOF_MARKERS and stream[start + 9] == 3:
        return (start + 10, start + 13, start + 16)
    if marker == 0xDA and stream[start + 4] == 3:
        return (start + 5, start + 7, start + 9)
    return ()


def component_id_offsets(stream: bytes) -> list[int] | None:
    """Offsets of the SOF and SOS component ids of a 3-component stream, or None when the stream
    declares its colour space (then it needs no fix): both answers from one header walk."""
    offsets: list[int] = []
    for marker, start, _ in iter_segments(stream):
        if _is_colour_declaration(stream, marker, start):
            return None
        offsets += _id_offsets(stream, marker, start)
    return offsets


def _with_rgb_ids(head: bytes, stream: bytes, skip: int, offsets: list[int]) -> bytes:
    """``head + stream[skip:]`` with the bytes at ``offsets`` (positions in ``stream``) set to
    'R', 'G', 'B' in turn, built with one copy of the stream."""
    out = bytearray(head)
    out += memoryview(stream)[skip:]
    shift = len(head) - skip
    for k, offset in enumerate(offsets):
        out[shift + offset] = RGB_IDS[k % 3]
    return bytes(out)


def rename_rgb_components(stream: bytes) -> bytes:
    """Set the SOF and SOS component ids of a 3-component stream to 'R', 'G', 'B'.

    Ids are only labels matched between SOF and SOS, so renaming both changes nothing else.
    """
    offsets = [offset for marker, start, _ in iter_segments(stream) for offset in _id_offsets(stream, marker, start)]
    return _with_rgb_ids(b"", stream, 0, offsets) if offsets else stream


def restart_interval_to_stream(header: bytes, interval: bytes) -> bytes:
    """NDPI: header (SOI..SOS, sized for one interval) + interval data with its RSTn made EOI."""
    if len(interval) >= 2 and interval[-2] == 0xFF and 0xD0 <= interval[-1] <= 0xD7:
        return header + interval[:-2] + EOI
    if interval.endswith(EOI):
        return header + interval
    return header + interval + EOI


class JpegTileFixer:
    """Per-level rule that makes each stored JPEG tile a self-contained, colour-correct stream.

    ``tables``: the page's JPEGTables (or None); ``rgb``: photometric is RGB (Aperio-style tiles
    need the APP14 + component-id fix unless they declare their colour space themselves);
    ``ndpi_header``: tifffile's rewritten NDPI header when tiles are restart intervals.
    """

    def __init__(self, tables: bytes | None, rgb: bool, ndpi_header: bytes | None = None) -> None:
        self.ndpi_header = ndpi_header
        declared = any(part is not None and declares_colour_space(part) for part in (tables, ndpi_header))
        self.rgb = rgb and not declared
        # without the APP14 this is the splice rule tables[:-2] + tile[2:]
        body = tables[2:-2] if tables else b""
        self.prefix = SOI + (APP14_RGB if self.rgb else b"") + body

    def __call__(self, tile: bytes) -> bytes:
        """The self-contained stream for one stored tile (empty input stays empty: missing tile)."""
        if not tile:
            return tile
        if self.ndpi_header is not None:
            stream = restart_interval_to_stream(self.ndpi_header, tile)
            if self.rgb:
                stream = SOI + APP14_RGB + rename_rgb_components(stream)[2:]
            return stream
        if tile[:2] != SOI:  # not a JPEG: leave it for the decoder to reject with a clear message
            return tile
        if self.rgb:
            offsets = component_id_offsets(tile)
            if offsets is None:  # the tile declares its colour space: splice without our APP14
                return SOI + self.prefix[len(SOI) + len(APP14_RGB) :] + tile[2:]
            return _with_rgb_ids(self.prefix, tile, 2, offsets)
        return self.prefix + tile[2:]
