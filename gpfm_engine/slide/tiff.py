"""The TIFF fast path: SVS, generic tiled or stripped TIFF, BigTIFF, OME-TIFF (SubIFD pyramids), NDPI.

tifffile parses the file once at open: tile offsets and byte counts per level, JPEG tables, the
NDPI restart-interval header, metadata. After that the file is read only with ``os.pread`` on a
private descriptor (no shared file offset, so any number of threads can read at once) and tiles
are decoded by ``gpfm_engine.decode`` (imagecodecs releases the GIL). Layouts tifffile cannot
describe faithfully (Leica SCN regions, Ventana BIF overlaps, Philips sparse levels, channel or
z stacks) are refused with a ``SlideError`` so that ``open_slide`` falls back to OpenSlide.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tifffile

from gpfm_engine.decode.cpu import SCALED_JPEG, StreamDecodeError, decode
from gpfm_engine.errors import SlideError, TileDecodeError, exception_summary
from gpfm_engine.slide.base import LazyImages, Slide, TileLayout, WHITE, downsamples_from_dimensions
from gpfm_engine.slide.jpeg import JpegTileFixer
from gpfm_engine.slide.reduced_levels import reduced_levels
from gpfm_engine.slide.tiff_meta import read_metadata
from gpfm_engine.slide.tile_cache import TileCache

# TIFF Compression tag -> gpfm_engine.decode compression name
COMPRESSION_NAMES = {1: "none", 5: "lzw", 7: "jpeg", 8: "deflate", 32946: "deflate", 33003: "jpeg2000_ycbcr",
                     33005: "jpeg2000", 34712: "jpeg2000"}
# tifffile flags of layouts the fast path leaves to OpenSlide
_REFUSED_FLAGS = {"scn": "Leica SCN", "bif": "Ventana BIF", "philips": "Philips TIFF", "qpi": "PerkinElmer QPTIFF"}
_MAX_TILE_PIXELS = 1 << 28  # one stored tile/strip above this is not a tile (e.g. a 100k-px strip image)
_MAX_READ_RUN = 16 << 20  # coalesce adjacent tiles into reads of at most this many bytes


class FastPathRefused(SlideError):
    """The file is intact but its layout is not one the fast path reads; another backend may."""


@dataclass(frozen=True)
class _Level:
    """Where one level's stored tiles are and how to turn them into pixels."""

    layout: TileLayout
    offsets: np.ndarray  # int64 per tile
    counts: np.ndarray  # int64 per tile; 0 = missing tile
    samples: int
    predictor: int
    fixer: JpegTileFixer | None


class TiffSlide(Slide):
    """A TIFF-family slide read through raw stored tiles."""

    backend = "tiff"

    def __init__(self, path: str | Path, *, mpp: float | None = None, tile_cache: TileCache | None = None) -> None:
        super().__init__(path, mpp=mpp, tile_cache=tile_cache)
        try:
            tf = tifffile.TiffFile(self.path)
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on malformed input
            raise FastPathRefused(self.path, f"not a readable TIFF ({exception_summary(exc)})") from exc
        with tf:
            pages = _pyramid_pages(tf, self.path)
            self._levels = [_read_level_table(page, self.path, i) for i, page in enumerate(pages)]
            _check_complete(tf, self._levels, self.path)
            meta = read_metadata(tf, pages[0])
        self.vendor = meta.vendor
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        if meta.vendor == "hamamatsu":  # OpenSlide's levels: stored ones plus DCT-scaled decodes
            self._levels, self.level_dimensions = _with_reduced_levels(self._levels, self.level_dimensions)
        self.level_downsamples = downsamples_from_dimensions(self.level_dimensions)
        self.objective_power = meta.objective_power
        self._native_mpp, self._native_mpp_source = meta.mpp, meta.mpp_source
        self.properties = meta.properties
        self._associated_pages = {name: index for name, (index, _) in meta.associated.items()}
        self.associated_images = LazyImages({name: size for name, (_, size) in meta.associated.items()},
                                            self._load_associated)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise SlideError(self.path, f"cannot open for reading ({exc.strerror})") from exc

    # -- hooks ----------------------------------------------------------------------------------

    def _tile_layout(self, level: int) -> TileLayout:
        return self._levels[level].layout

    def _read_raw_tiles(self, level: int, indices: list[int]) -> list[bytes]:
        raw = self._pread_tiles(level, indices)
        fixer = self._levels[level].fixer
        return [fixer(data) for data in raw] if fixer is not None else raw

    def _decode_tiles(self, level: int, indices: list[int]) -> list[np.ndarray]:
        lv = self._levels[level]
        layout = lv.layout
        streams = self._read_raw_tiles(level, indices)
        present = [k for k, s in enumerate(streams) if s]
        try:
            decoded = decode([streams[k] for k in present], layout.compression,
                             shape=(layout.tile_height, layout.tile_width, lv.samples), predictor=lv.predictor)
        except StreamDecodeError as exc:
            raise TileDecodeError(self.path, level, indices[present[exc.position]], exc.cause) from None
        out = dict(zip(present, decoded))
        return [out[k] if k in out else np.full((layout.tile_height, layout.tile_width, 3), WHITE, np.uint8)
                for k in range(len(streams))]

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        layout = self._levels[level].layout
        tw, th = layout.tile_width, layout.tile_height
        out = np.empty((h, w, 3), np.uint8)
        cols = range(x // tw, (x + w - 1) // tw + 1)
        for row in range(y // th, (y + h - 1) // th + 1):
            tiles = self.read_tiles(level, [row * layout.columns + col for col in cols])
            ty = row * th
            y0, y1 = max(y, ty), min(y + h, ty + th)
            for col, tile in zip(cols, tiles):
                tx = col * tw
                x0, x1 = max(x, tx), min(x + w, tx + tw)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
        return out

    def _close(self) -> None:
        os.close(self._fd)

    # -- internals ------------------------------------------------------------------------------

    def _pread_tiles(self, level: int, indices: list[int]) -> list[bytes]:
        """Stored bytes of each tile, reading runs of adjacent tiles with one ``os.pread``."""
        lv = self._levels[level]
        offsets, counts = lv.offsets[indices].tolist(), lv.counts[indices].tolist()
        out = [b""] * len(indices)
        runs: list[tuple[int, list[int]]] = []  # (start, positions); a run ends at its last tile's end
        end = -1
        for k in sorted(range(len(indices)), key=offsets.__getitem__):
            off, cnt = offsets[k], counts[k]
            if cnt == 0:
                continue
            if off == end and off + cnt - runs[-1][0] <= _MAX_READ_RUN:
                runs[-1][1].append(k)
            else:
                runs.append((off, [k]))
            end = off + cnt
        for start, members in runs:
            last = members[-1]
            try:
                data = os.pread(self._fd, offsets[last] + counts[last] - start, start)
            except OSError as exc:
                raise SlideError(self.path, f"read failed at byte {start} ({exc.strerror})") from exc
            for k in members:
                a = offsets[k] - start
                chunk = data[a : a + counts[k]]
                if len(chunk) < counts[k]:
                    raise TileDecodeError(self.path, level, indices[k],
                                          f"tile data truncated ({len(chunk)} of {counts[k]} bytes)")
                out[k] = chunk
        return out

    def _load_associated(self, name: str) -> np.ndarray:
        try:
            with tifffile.TiffFile(self.path) as tf:
                return tf.pages[self._associated_pages[name]].asarray()
        except Exception as exc:  # noqa: BLE001 - any decode failure is this image's failure
            raise SlideError(self.path, f"associated image {name!r}: {exception_summary(exc)}") from exc


def _pyramid_pages(tf: tifffile.TiffFile, path: Path) -> list[tifffile.TiffPage]:
    """Level pages of the main image series, largest first; refuse what is not an RGB pyramid."""
    refused = sorted(set(tf.flags) & set(_REFUSED_FLAGS))
    if refused:
        raise FastPathRefused(path, f"{_REFUSED_FLAGS[refused[0]]} layout is not read by the TIFF fast path")
    if tf.is_svs:  # Aperio: the tiled pages are the pyramid (tifffile assumes page 1 is a thumbnail)
        pages = sorted((p for p in tf.pages if p.is_tiled), key=lambda p: -int(p.imagewidth))
        if not pages:
            raise FastPathRefused(path, "Aperio file without tiled pyramid pages")
        return pages
    if not tf.series:
        raise FastPathRefused(path, "TIFF holds no image")
    pages = []
    for i, level in enumerate(tf.series[0].levels):
        if len(level.pages) != 1:
            raise FastPathRefused(path, f"level {i} is a stack of {len(level.pages)} planes (channels, z or time), "
                                   "not one RGB image")
        page = level.keyframe
        if not isinstance(page, tifffile.TiffPage):
            raise FastPathRefused(path, f"level {i} has no readable IFD")
        pages.append(page)
    return sorted(pages, key=lambda p: -int(p.imagewidth))


def _with_reduced_levels(levels: list[_Level], dimensions: tuple[tuple[int, int], ...]
                         ) -> tuple[list[_Level], tuple[tuple[int, int], ...]]:
    """Stored levels plus the reduced JPEG levels OpenSlide adds to Hamamatsu slides.

    A reduced level reads the same stored tiles as its source; its layout has the tile size
    divided by the denominator and a ``"jpeg/N"`` compression, so decoders that only decode at
    full size (the GPU plug-ins) never claim it and tiles are decoded at 1/N on the CPU.
    """
    names = {denom: name for name, denom in SCALED_JPEG.items()}
    out_levels, out_dims = [], []
    for source, denom in reduced_levels(dimensions, [lv.layout for lv in levels]):
        lv, (width, height) = levels[source], dimensions[source]
        if denom > 1:
            layout = lv.layout
            lv = replace(lv, layout=TileLayout(layout.tile_width // denom, layout.tile_height // denom, layout.columns,
                                               layout.rows, names[denom]))
        out_levels.append(lv)
        out_dims.append((width // denom, height // denom))
    return out_levels, tuple(out_dims)


def _check_complete(tf: tifffile.TiffFile, levels: list[_Level], path: Path) -> None:
    """A file cut short (interrupted copy) fails at open, never as a slide with levels missing.

    tifffile stops quietly at an IFD pointer past the end of the file, so the chain's last
    next-IFD pointer must be 0, and every page's data must lie inside the file.
    """
    fh, fmt = tf.filehandle, tf.tiff
    size = fh.size
    order = "little" if fmt.byteorder == "<" else "big"
    pages = tf.pages
    last = pages[len(pages) - 1]  # len() walks every IFD tifffile can reach
    fh.seek(last.offset)
    count = int.from_bytes(fh.read(fmt.tagnosize), order)
    fh.seek(last.offset + fmt.tagnosize + count * fmt.tagsize)
    pointer = fh.read(fmt.offsetsize)  # 8 bytes for BigTIFF and NDPI
    if len(pointer) < fmt.offsetsize or int.from_bytes(pointer, order) >= size:
        raise SlideError(path, f"file truncated: the IFD chain continues past the end of the file ({size} bytes)")
    ends = [lv.offsets + lv.counts for lv in levels]
    ends += [np.asarray(p.dataoffsets, np.int64) + np.asarray(p.databytecounts, np.int64) for p in pages
             if p.dataoffsets]
    end = max((int(e.max()) for e in ends if e.size), default=0)
    if end > size:
        raise SlideError(path, f"file truncated: image data runs to byte {end}, the file has {size}")


def _read_level_table(page: tifffile.TiffPage, path: Path, level: int) -> _Level:
    """Validate one level page and capture its tile table."""
    def refuse(cause: str) -> FastPathRefused:
        return FastPathRefused(path, f"level {level}: {cause}")

    code = int(page.compression)
    compression = COMPRESSION_NAMES.get(code)
    if compression is None:
        name = getattr(page.compression, "name", None)
        raise refuse(f"unsupported TIFF compression {code}" + (f" ({name})" if name else ""))
    if page.bitspersample != 8 or page.sampleformat != 1:
        raise refuse(f"{page.bitspersample}-bit samples (format {int(page.sampleformat)}); only 8-bit is supported")
    samples, photometric = int(page.samplesperpixel), int(page.photometric)
    if samples > 1 and int(page.planarconfig) != 1:
        raise refuse("separate colour planes (PlanarConfiguration 2) are not supported")
    allowed = {1: (1, 2), 2: (3, 4), 6: (3,)}.get(photometric, ())
    if samples not in allowed or (photometric == 6 and compression in ("none", "lzw", "deflate")):
        raise refuse(f"photometric {photometric} with {samples} samples per pixel is not RGB, grey or YCbCr-JPEG")
    predictor = int(page.predictor) if compression in ("none", "lzw", "deflate") else 1
    if predictor not in (1, 2):
        raise refuse(f"unsupported TIFF predictor {predictor}")
    width, height = int(page.imagewidth), int(page.imagelength)
    if page.is_tiled:
        if page.tiledepth > 1:
            raise refuse("3-D tiles are not supported")
        tw, th = int(page.tilewidth), int(page.tilelength)
    else:
        tw, th = width, min(int(page.rowsperstrip or height), height)
    if tw * th > _MAX_TILE_PIXELS:
        raise refuse(f"stored tile of {tw}x{th} px is too large for tile access")
    layout = TileLayout(tw, th, math.ceil(width / tw), math.ceil(height / th), compression)
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if offsets.size != layout.count or counts.size != layout.count:
        raise refuse(f"tile table has {offsets.size} entries, the {layout.columns}x{layout.rows} grid needs "
                     f"{layout.count}")
    fixer = None
    if compression == "jpeg":
        ndpi_header = page.jpegheader if page.is_ndpi else None
        fixer = JpegTileFixer(page.jpegtables, rgb=photometric == 2, ndpi_header=ndpi_header)
    return _Level(layout, offsets, counts, samples, predictor, fixer)
