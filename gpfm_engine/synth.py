"""Synthesized whole-slide images: pyramidal tiled TIFFs that look like tissue on glass.

Used by the test suite (every format and compression the reader must handle), by the benchmarks
(a large slide generated once) and by the bundled demo. Content is procedural, so a slide of any
size is rendered tile by tile in bounded memory: smooth tissue islands (eosin pink stroma with
hematoxylin purple nuclei) on a near-white background, which the tissue masker can find.

Formats: Aperio-like SVS (ImageDescription with ``MPP =`` / ``AppMag =``, 240 px tiles, levels at
4x steps, stripped thumbnail, label and macro), generic tiled TIFF with resolution tags, BigTIFF,
OME-TIFF with SubIFD pyramids. Compressions: JPEG YCbCr (abbreviated tiles + shared JPEGTables, as
libtiff writes), JPEG RGB (Aperio style: RGB components, no APP14 marker, component ids 0,1,2,
so a plain decoder gets wrong colours), JPEG 2000 (Aperio 33005), LZW, deflate, none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import imagecodecs
import numpy as np
import tifffile

Compression = Literal["jpeg", "jpeg_rgb", "jpeg2000", "lzw", "deflate", "none"]
SlideFormat = Literal["svs", "tiff", "bigtiff", "ome"]
COMPRESSIONS: tuple[str, ...] = ("jpeg", "jpeg_rgb", "jpeg2000", "lzw", "deflate", "none")
FORMATS: tuple[str, ...] = ("svs", "tiff", "bigtiff", "ome")

BACKGROUND = np.array([242.0, 241.0, 238.0])
EOSIN = np.array([226.0, 150.0, 190.0])
HEMATOXYLIN = np.array([92.0, 52.0, 138.0])

# The size, in micrometres, of the features of the pattern: tissue islands and nuclei keep their
# physical size whatever the slide's mpp, so masking and patch geometry behave as on real slides.
ISLAND_UM = 900.0
NUCLEUS_UM = 7.0


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic per-lattice-point uniform values in [0, 1) (no state, any region size)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (seed * 83492791 + 0x5BD1E995)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).astype(np.float64) / float(0x1000000)


def _value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth noise on a unit lattice: bilinear (smoothstep) interpolation of hashed values."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    v00, v10 = _hash01(x0, y0, seed), _hash01(x0 + 1, y0, seed)
    v01, v11 = _hash01(x0, y0 + 1, seed), _hash01(x0 + 1, y0 + 1, seed)
    return (v00 * (1 - fx) + v10 * fx) * (1 - fy) + (v01 * (1 - fx) + v11 * fx) * fy


@dataclass(frozen=True)
class TissuePattern:
    """Procedural tissue over a ``width`` x ``height`` level-0 plane at ``mpp`` micrometres/pixel.

    ``coverage`` (0..1) shifts the island threshold: 0 gives an empty (all background) slide.
    """

    width: int
    height: int
    mpp: float = 0.25
    seed: int = 0
    coverage: float = 0.45

    def render(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """RGB uint8 [h, w, 3] of the region whose top-left is level-0 (x, y) * downsample-scaled.

        (x, y) are in the pixel grid of the level with this ``downsample``.
        """
        px_um = self.mpp * downsample
        xs = (x + np.arange(w) + 0.5) * px_um
        ys = (y + np.arange(h) + 0.5) * px_um
        gx, gy = np.meshgrid(xs, ys)
        isl = 0.65 * _value_noise(gx / ISLAND_UM, gy / ISLAND_UM, self.seed)
        isl += 0.35 * _value_noise(gx / (ISLAND_UM / 3), gy / (ISLAND_UM / 3), self.seed + 1)
        # keep a margin of glass around the specimen, as on a real slide
        wu, hu = self.width * self.mpp, self.height * self.mpp
        edge = np.minimum(np.minimum(gx, wu - gx), np.minimum(gy, hu - gy)) / max(min(wu, hu), 1e-9)
        isl = isl * np.clip(edge * 8.0, 0.0, 1.0)
        tissue = np.clip((isl - (0.62 - 0.3 * self.coverage)) * 12.0, 0.0, 1.0)
        if self.coverage <= 0:
            tissue[:] = 0.0
        nuc = _value_noise(gx / NUCLEUS_UM, gy / NUCLEUS_UM, self.seed + 2)
        nuclei = np.clip((nuc - 0.62) * 8.0, 0.0, 1.0)
        fibre = _value_noise(gx / (NUCLEUS_UM * 3), gy / (NUCLEUS_UM * 0.7), self.seed + 3)
        stain = EOSIN * (0.85 + 0.3 * fibre[..., None]) * (1 - nuclei[..., None]) + HEMATOXYLIN * nuclei[..., None]
        grain = (_hash01(np.floor(gx / px_um), np.floor(gy / px_um), self.seed + 4) - 0.5) * 6.0
        rgb = BACKGROUND * (1 - tissue[..., None]) + stain * tissue[..., None] + grain[..., None]
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --- JPEG stream surgery -------------------------------------------------------------------------


def _segments(stream: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment before the scan data; SOS ends the walk."""
    pos = 2  # after SOI
    while pos < len(stream):
        marker = stream[pos + 1]
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        yield marker, pos, pos + 2 + length
        if marker == 0xDA:
            return
        pos += 2 + length


def split_jpeg_tables(stream: bytes) -> tuple[bytes, bytes]:
    """Split a full JPEG into (tables-only stream, abbreviated stream) as libtiff stores them.

    Tables: SOI, DQT..., DHT..., EOI. Abbreviated: SOI, SOF, SOS + scan, EOI (APPn dropped).
    """
    tables, body = [b"\xff\xd8"], [b"\xff\xd8"]
    for marker, start, end in _segments(stream):
        seg = stream[start:end]
        if marker in (0xDB, 0xC4):
            tables.append(seg)
        elif marker == 0xDA:
            body.append(stream[start:])
        elif not 0xE0 <= marker <= 0xEF:
            body.append(seg)
    tables.append(b"\xff\xd9")
    return b"".join(tables), b"".join(body)


def _aperio_component_ids(stream: bytes) -> bytes:
    """Rename the SOF/SOS component ids of an RGB JPEG to 0, 1, 2, as Aperio scanners write."""
    out = bytearray(stream)
    for marker, start, _ in _segments(stream):
        if marker == 0xC0:
            ncomp = out[start + 9]
            for i in range(ncomp):
                out[start + 10 + 3 * i] = i
        elif marker == 0xDA:
            ncomp = out[start + 4]
            for i in range(ncomp):
                out[start + 5 + 2 * i] = i
    return bytes(out)


def _encode_tile(tile: np.ndarray, compression: str, quality: int) -> bytes:
    if compression == "jpeg":
        return imagecodecs.jpeg8_encode(tile, level=quality, outcolorspace="ycbcr", subsampling=(2, 2))
    if compression == "jpeg_rgb":
        return imagecodecs.jpeg8_encode(tile, level=quality, outcolorspace="rgb")
    if compression == "jpeg2000":
        return imagecodecs.jpeg2k_encode(tile, level=quality, codecformat="j2k")
    if compression == "lzw":
        return imagecodecs.lzw_encode(tile.tobytes())
    if compression == "deflate":
        return imagecodecs.zlib_encode(tile.tobytes(), level=6)
    if compression == "none":
        return tile.tobytes()
    raise ValueError(f"unknown compression {compression!r}; choose from {COMPRESSIONS}")


_TIFF_COMPRESSION = {"jpeg": 7, "jpeg_rgb": 7, "jpeg2000": 33005, "lzw": 5, "deflate": 8, "none": 1}


def _level_sizes(width: int, height: int, tile: int, downsample: int, levels: int | None) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while (levels is None and max(sizes[-1]) > 2 * tile) or (levels is not None and len(sizes) < levels):
        w, h = sizes[-1]
        if min(w, h) < downsample:
            break
        sizes.append((max(1, w // downsample), max(1, h // downsample)))
    return sizes


class _TileStream:
    """Encodes the tiles of one level on the fly; captures the shared JPEG tables."""

    def __init__(self, pattern: TissuePattern, size: tuple[int, int], downsample: float, tile: int,
                 compression: str, quality: int, image: np.ndarray | None) -> None:
        self.pattern, self.size, self.downsample, self.tile = pattern, size, downsample, tile
        self.compression, self.quality, self.image = compression, quality, image
        first = self._encode(0, 0)
        self.jpegtables = split_jpeg_tables(first)[0] if compression in ("jpeg", "jpeg_rgb") else None

    def _pixels(self, tx: int, ty: int) -> np.ndarray:
        t = self.tile
        if self.image is not None:
            out = np.zeros((t, t, 3), np.uint8)
            part = self.image[ty * t : ty * t + t, tx * t : tx * t + t]
            out[: part.shape[0], : part.shape[1]] = part
            return out
        return self.pattern.render(tx * t, ty * t, t, t, self.downsample)

    def _encode(self, tx: int, ty: int) -> bytes:
        return _encode_tile(self._pixels(tx, ty), self.compression, self.quality)

    def __iter__(self) -> Iterator[bytes]:
        w, h = self.size
        for ty in range(math.ceil(h / self.tile)):
            for tx in range(math.ceil(w / self.tile)):
                data = self._encode(tx, ty)
                if self.jpegtables is not None:
                    data = split_jpeg_tables(data)[1]
                    if self.compression == "jpeg_rgb":
                        data = _aperio_component_ids(data)
                yield data


def _resize_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Box-filter downsample of an explicit image (used when the caller supplies level-0 pixels)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def write_slide(
    path: str | Path,
    *,
    size: tuple[int, int] = (4000, 3000),
    fmt: SlideFormat = "svs",
    compression: Compression = "jpeg",
    tile: int = 240,
    mpp: float | None = 0.25,
    objective: float | None = 40.0,
    levels: int | None = None,
    downsample: int = 4,
    seed: int = 0,
    coverage: float = 0.45,
    quality: int = 90,
    image: np.ndarray | None = None,
    associated: bool = True,
    resolution_unit: Literal["centimeter", "inch", "none"] = "centimeter",
) -> Path:
    """Write a synthesized pyramidal slide and return its path.

    ``image`` (uint8 [H, W, 3]) replaces the procedural tissue with given level-0 pixels (levels are
    box-downsampled from it). ``mpp=None`` writes no physical size at all. Level sizes follow the
    Aperio rule ``floor(previous / downsample)``.
    """
    path = Path(path)
    if image is not None:
        size = (image.shape[1], image.shape[0])
    width, height = size
    pattern = TissuePattern(width, height, mpp or 0.25, seed, coverage)
    sizes = _level_sizes(width, height, tile, downsample, levels)
    comp = _TIFF_COMPRESSION[compression]
    photometric = "ycbcr" if compression == "jpeg" else "rgb"
    bigtiff = fmt == "bigtiff" or width * height * 3 > 3_500_000_000

    def level_image(i: int) -> np.ndarray | None:
        return None if image is None else (image if i == 0 else _resize_area(image, sizes[i]))

    def common(i: int) -> dict:
        w, h = sizes[i]
        stream = _TileStream(pattern, (w, h), width / w, tile, compression, quality, level_image(i))
        kw = dict(
            data=iter(stream), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), compression=comp,
            photometric=photometric, jpegtables=stream.jpegtables, metadata=None,
        )
        if compression in ("jpeg", "jpeg_rgb"):
            kw["subsampling"] = (2, 2) if compression == "jpeg" else (1, 1)
        return kw

    def resolution(i: int) -> dict:
        if mpp is None or resolution_unit == "none":
            return {}
        scale = (width / sizes[i][0]) * mpp
        per_unit = 1e4 / scale if resolution_unit == "centimeter" else 25400.0 / scale
        return {"resolution": (per_unit, per_unit), "resolutionunit": resolution_unit.upper()}

    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        if fmt == "svs":
            _write_svs(tw, width, height, sizes, tile, mpp, objective, compression, quality, common, pattern,
                       associated, image)
        elif fmt == "ome":
            _write_ome(tw, sizes, mpp, common)
        else:
            for i in range(len(sizes)):
                tw.write(**common(i), subfiletype=0 if i == 0 else 1, **resolution(i))
    if compression == "jpeg_rgb":
        _mark_tiles_rgb(path)
    return path


def _mark_tiles_rgb(path: Path) -> None:
    """Set PhotometricInterpretation = RGB on the tiled JPEG pages.

    tifffile always labels JPEG-in-TIFF as YCbCr; Aperio RGB slides say RGB while their streams
    carry no colour-transform marker, which is exactly the case readers must get right.
    """
    with tifffile.TiffFile(path, mode="r+b") as tf:
        pages = list(tf.pages)
        for page in pages:
            for sub in page.pages or ():
                pages.append(sub)
        for page in pages:
            if page.is_tiled and page.compression == 7:
                page.tags[262].overwrite(2)
                if 530 in page.tags:
                    page.tags[530].overwrite((1, 1))


def _aperio_description(width: int, height: int, tile: int, mpp: float | None, objective: float | None,
                        compression: str, quality: int, level_size: tuple[int, int] | None = None) -> str:
    codec = {"jpeg": "JPEG/YCC", "jpeg_rgb": "JPEG/RGB", "jpeg2000": "J2K/RGB"}.get(compression, compression.upper())
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    if level_size is not None:
        head += f" -> {level_size[0]}x{level_size[1]}"
    fields = [f"{head} {codec} Q={quality}", "ScanScope ID = SS1234", "Filename = synth", "Date = 11/28/26",
              "Time = 12:00:00"]
    if objective is not None:
        fields.append(f"AppMag = {objective:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.4f}")
    return "|".join(fields)


def _write_svs(tw: tifffile.TiffWriter, width: int, height: int, sizes: list[tuple[int, int]], tile: int,
               mpp: float | None, objective: float | None, compression: str, quality: int, common, pattern,
               associated: bool, image: np.ndarray | None) -> None:
    """Aperio layout: level 0, stripped thumbnail, the other levels, then label and macro."""
    tw.write(**common(0), description=_aperio_description(width, height, tile, mpp, objective, compression, quality))
    if associated:
        tw_, th = _thumb_size(width, height, 768)
        thumb = pattern.render(0, 0, tw_, th, width / tw_) if image is None else _resize_area(image, (tw_, th))
        tw.write(thumb, photometric="rgb", compression="jpeg", rowsperstrip=16, metadata=None,
                 description=_aperio_description(width, height, tile, mpp, objective, compression, quality, (tw_, th)))
    for i in range(1, len(sizes)):
        tw.write(**common(i), subfiletype=0,
                 description=_aperio_description(width, height, tile, mpp, objective, compression, quality, sizes[i]))
    if associated:
        rng = np.random.default_rng(7)
        label = np.full((120, 300, 3), 250, np.uint8)
        label[30:90, 40:260] = rng.integers(0, 60, (60, 220, 1), dtype=np.uint8)
        tw.write(label, photometric="rgb", compression="lzw", rowsperstrip=16, subfiletype=1, metadata=None,
                 description="Aperio Image Library v12.0.15\r\nlabel 300x120")
        macro = np.full((200, 500, 3), 230, np.uint8)
        macro[40:160, 150:450] = (200, 140, 180)
        tw.write(macro, photometric="rgb", compression="jpeg", rowsperstrip=16, subfiletype=9, metadata=None,
                 description="Aperio Image Library v12.0.15\r\nmacro 500x200")


def _write_ome(tw: tifffile.TiffWriter, sizes: list[tuple[int, int]], mpp: float | None, common) -> None:
    """OME-TIFF: level 0 in the main IFD carrying OME-XML, the pyramid in its SubIFDs."""
    w, h = sizes[0]
    phys = f' PhysicalSizeX="{mpp}" PhysicalSizeXUnit="µm" PhysicalSizeY="{mpp}" PhysicalSizeYUnit="µm"' if mpp else ""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        '<Image ID="Image:0" Name="synth"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" '
        f'SizeX="{w}" SizeY="{h}" SizeC="3" SizeZ="1" SizeT="1"{phys} Interleaved="true">'
        '<Channel ID="Channel:0:0" SamplesPerPixel="3"/><TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>'
    )
    tw.write(**common(0), subifds=len(sizes) - 1, description=xml.encode())
    for i in range(1, len(sizes)):
        tw.write(**common(i), subfiletype=1)


def _thumb_size(width: int, height: int, longest: int) -> tuple[int, int]:
    s = longest / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))
