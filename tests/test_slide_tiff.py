"""The TIFF fast path on synthesized slides of every format and compression the factory makes.

References: tifffile's own decode of each level page (independent tile assembly and colour-space
handling) and the source pixels the slide was written from. Tolerances: lossless codecs 0;
lossy codecs <= 2 against tifffile (same libjpeg-turbo / OpenJPEG, rounding only) and a mean
error < 6 against the source (colours right within JPEG/JPEG 2000 loss; a colour-space mistake
costs tens).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile

from gpfm_engine import synth
from gpfm_engine.decode import RAW_COMPRESSIONS, decode
from gpfm_engine.errors import SlideError
from gpfm_engine.slide import TileCache, open_slide

# Odd size on purpose: 517 x 389 on 128-px tiles leaves partial tiles on the right and bottom edges,
# and 2x levels of odd sizes (258 x 194, 129 x 97).
SIZE = (517, 389)
SOURCE = synth.TissuePattern(*SIZE, mpp=2.0, seed=3, coverage=0.8).render(0, 0, *SIZE)
LOSSLESS = {"lzw", "deflate", "none"}


def make(slide_factory, fmt: str, compression: str, **kw):
    kw.setdefault("associated", fmt == "svs")
    return slide_factory(fmt=fmt, compression=compression, tile=128, downsample=2, image=SOURCE, **kw)


def tifffile_levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tf:
        return [level.asarray() for level in tf.series[0].levels]


@pytest.mark.parametrize("compression", synth.COMPRESSIONS)
@pytest.mark.parametrize("fmt", synth.FORMATS)
def test_levels_match_tifffile_and_source(slide_factory, fmt, compression):
    path = make(slide_factory, fmt, compression)
    refs = tifffile_levels(path)
    with open_slide(path) as slide:
        assert slide.backend == "tiff"
        assert slide.level_dimensions == tuple((r.shape[1], r.shape[0]) for r in refs)
        assert slide.level_count == 3  # OME: SubIFD levels found
        tolerance = 0 if compression in LOSSLESS else 2
        for level, ref in enumerate(refs):
            ours = slide.read_region((0, 0), level, slide.level_dimensions[level])
            assert ours.dtype == np.uint8 and ours.shape == ref.shape
            assert np.abs(ours.astype(int) - ref).max() <= tolerance, f"level {level}"
        level0 = slide.read_region((0, 0), 0, SIZE).astype(int)
    if compression in LOSSLESS:
        np.testing.assert_array_equal(level0, SOURCE)
    else:
        assert np.abs(level0 - SOURCE).mean() < 6  # a colour-space error gives tens


@pytest.mark.parametrize("fmt, compression", [("svs", "jpeg"), ("tiff", "deflate"), ("ome", "jpeg2000")])
def test_random_windows_including_outside(slide_factory, fmt, compression):
    """Windows anywhere (also past every edge) equal the level image padded with white."""
    path = make(slide_factory, fmt, compression)
    refs = tifffile_levels(path)
    rng = np.random.default_rng(0)
    with open_slide(path) as slide:
        for level, ref in enumerate(refs):
            lh, lw = ref.shape[:2]
            ds = slide.level_downsamples[level]
            canvas = np.full((lh + 400, lw + 400, 3), 255, np.uint8)
            canvas[200 : 200 + lh, 200 : 200 + lw] = ref
            for _ in range(15):
                w, h = (int(v) for v in rng.integers(1, 200, 2))
                x, y = int(rng.integers(-150, lw + 100)), int(rng.integers(-150, lh + 100))
                # level-0 location mapping back exactly onto level pixel (x, y)
                ours = slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
                expect = canvas[200 + y : 200 + y + h, 200 + x : 200 + x + w]
                tolerance = 0 if compression in LOSSLESS else 2
                assert np.abs(ours[: expect.shape[0], : expect.shape[1]].astype(int) - expect).max() <= tolerance
                assert (ours[expect.shape[0] :] == 255).all() and (ours[:, expect.shape[1] :] == 255).all()


@pytest.mark.parametrize("compression", synth.COMPRESSIONS)
def test_tiles_raw_and_decoded(slide_factory, compression):
    path = make(slide_factory, "tiff", compression)
    with open_slide(path) as slide:
        layout = slide.tile_layout(0)
        assert (layout.tile_width, layout.tile_height, layout.columns, layout.rows) == (128, 128, 5, 4)
        indices = list(range(layout.count))
        tiles = slide.read_tiles(0, indices)
        raw = slide.read_raw_tiles(0, indices)
        region = slide.read_region((0, 0), 0, SIZE)
    assert all(t.shape == (128, 128, 3) and t.dtype == np.uint8 and not t.flags.writeable for t in tiles)
    edge = tiles[layout.count - 1]  # bottom-right: 517 - 512 = 5 columns, 389 - 384 = 5 rows inside
    assert (edge[5:] == 255).all() and (edge[:, 5:] == 255).all()
    for index, tile in enumerate(tiles):
        x, y = layout.origin(index)
        part = region[y : y + 128, x : x + 128]
        np.testing.assert_array_equal(tile[: part.shape[0], : part.shape[1]], part)
    # raw streams are self-contained: decode() alone gives the tile (inside the image)
    shape = (128, 128, 3) if layout.compression in RAW_COMPRESSIONS else None
    decoded = decode(raw, layout.compression, shape=shape)
    for index in (0, 6, layout.count - 1):
        x, y = layout.origin(index)
        vh, vw = min(128, SIZE[1] - y), min(128, SIZE[0] - x)
        np.testing.assert_array_equal(decoded[index][:vh, :vw], tiles[index][:vh, :vw])


def test_tile_aligned_region_decodes_each_stored_tile_once(slide_factory):
    path = make(slide_factory, "svs", "jpeg")
    cache = TileCache(10 << 20)
    with open_slide(path, tile_cache=cache) as slide:
        slide.read_region((128, 128), 0, (256, 256))
        assert (cache.misses, cache.hits, len(cache)) == (4, 0, 4)
        slide.read_region((128, 128), 0, (256, 256))
        assert (cache.misses, cache.hits) == (4, 4)
        slide.read_region((130, 100), 0, (10, 10))  # inside tiles 1 and 6: one new tile
        assert cache.misses == 5
    assert len(cache) == 0  # close() drops the slide's tiles from a shared cache


def test_concurrent_reads_equal_serial_reads(slide_factory):
    path = make(slide_factory, "svs", "jpeg")
    rng = np.random.default_rng(1)
    windows = [((int(rng.integers(0, 500)), int(rng.integers(0, 380))), int(rng.integers(0, 3)),
                (int(rng.integers(1, 150)), int(rng.integers(1, 150)))) for _ in range(60)]
    with open_slide(path, tile_cache=TileCache(0)) as slide:
        serial = [slide.read_region(*w) for w in windows]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda w: slide.read_region(*w), windows))
            tiles = slide.read_tiles(0, range(20), executor=pool)
    assert all((a == b).all() for a, b in zip(serial, parallel))
    assert len(tiles) == 20


@pytest.mark.parametrize(
    "fmt, kw, mpp, source",
    [
        ("svs", {}, (0.25, 0.25), "aperio"),
        ("tiff", {}, (0.25, 0.25), "tiff-resolution"),
        ("bigtiff", {"resolution_unit": "inch"}, (0.25, 0.25), "tiff-resolution"),
        ("tiff", {"resolution_unit": "none"}, None, None),
        ("ome", {}, (0.25, 0.25), "ome"),
        ("svs", {"mpp": None}, None, None),
        ("tiff", {"mpp": 60.0}, None, None),  # implausible (> 50 µm/px): unknown, never trusted
    ],
)
def test_physical_units(slide_factory, fmt, kw, mpp, source):
    path = make(slide_factory, fmt, "lzw", **kw)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(mpp) if mpp else slide.mpp is None
        assert slide.mpp_source == source
        if mpp:
            (w0, h0), (w2, h2) = slide.level_dimensions[0], slide.level_dimensions[2]
            assert slide.level_mpp(2) == pytest.approx((mpp[0] * w0 / w2, mpp[1] * h0 / h2))


def test_aperio_metadata_and_associated_images(slide_factory):
    path = make(slide_factory, "svs", "jpeg")
    with open_slide(path) as slide:
        assert slide.vendor == "aperio" and slide.objective_power == 40.0
        assert slide.properties["aperio.MPP"] == "0.2500" and "tiff.ImageDescription" in slide.properties
        assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
        for name, (w, h) in slide.associated_images.sizes.items():
            image = slide.associated_images[name]
            assert image.shape == (h, w, 3) and image.dtype == np.uint8
        assert (slide.associated_images["macro"][100, 300].astype(int) - (200, 140, 180)).__abs__().max() <= 8


def test_thumbnail_and_best_level(slide_factory):
    path = make(slide_factory, "tiff", "deflate")
    with open_slide(path) as slide:
        assert [slide.get_best_level_for_downsample(d) for d in (0.5, 1.9, 2.01, 3.99, 100)] == [0, 0, 1, 1, 2]
        thumb = slide.get_thumbnail((100, 100))
    assert thumb.shape == (75, 100, 3) and thumb.dtype == np.uint8  # 517 x 389 fit in 100 x 100
    assert np.abs(thumb.astype(int).mean((0, 1)) - SOURCE.mean((0, 1))).max() < 3


def test_request_validation(slide_factory):
    path = make(slide_factory, "tiff", "none")
    slide = open_slide(path)
    with pytest.raises(ValueError, match="level"):
        slide.read_region((0, 0), 3, (4, 4))
    with pytest.raises(ValueError, match="negative"):
        slide.read_region((0, 0), 0, (-1, 4))
    with pytest.raises(ValueError, match="integers"):
        slide.read_region((0.5, 0), 0, (4, 4))
    with pytest.raises(ValueError, match="tile index"):
        slide.read_tiles(0, [20])
    assert slide.read_region((0, 0), 0, (0, 0)).shape == (0, 0, 3)
    slide.close()
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), 0, (4, 4))


def test_pickle_reopens_and_forgotten_close_does_not_leak(slide_factory):
    import gc
    import os
    import pickle

    path = make(slide_factory, "svs", "jpeg")
    with open_slide(path, mpp=0.3) as slide:
        clone = pickle.loads(pickle.dumps(slide))  # what a DataLoader worker receives
        assert clone.mpp == (0.3, 0.3) and clone.backend == "tiff"
        np.testing.assert_array_equal(clone.read_region((40, 50), 1, (90, 70)), slide.read_region((40, 50), 1, (90, 70)))
        clone.close()
    if os.path.isdir("/proc/self/fd"):
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            open_slide(path).read_region((0, 0), 0, (8, 8))
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) <= before


def test_require_mpp(slide_factory):
    with open_slide(make(slide_factory, "tiff", "lzw", resolution_unit="none")) as slide:
        with pytest.raises(SlideError, match="mpp"):
            slide.require_mpp()
    with open_slide(make(slide_factory, "tiff", "lzw", resolution_unit="none"), mpp=0.5) as slide:
        assert slide.require_mpp() == (0.5, 0.5)


def test_missing_tile_is_background(slide_factory, tmp_path):
    """A tile with byte count 0 (sparse TIFF, Aperio 'missing tile') reads as white, raw as b''."""
    import shutil

    path = tmp_path / "sparse.tif"
    shutil.copy(make(slide_factory, "tiff", "jpeg"), path)
    with tifffile.TiffFile(path, mode="r+b") as tf:
        counts = list(tf.pages[0].databytecounts)
        counts[6] = 0
        tf.pages[0].tags["TileByteCounts"].overwrite(counts)
    with open_slide(path) as slide:
        assert slide.read_raw_tiles(0, [5, 6])[1] == b""
        tile5, tile6 = slide.read_tiles(0, [5, 6])
        assert (tile6 == 255).all() and not (tile5 == 255).all()
        x, y = slide.tile_layout(0).origin(6)
        assert (slide.read_region((x, y), 0, (128, 128)) == 255).all()


def test_reduced_levels_follow_openslides_hamamatsu_rule():
    """Stored JPEG levels plus their 1/2, 1/4, 1/8 decodes where the tile divides, one level per width,
    each from the smallest stored level that yields it; other compressions are never reduced."""
    from gpfm_engine.slide.base import TileLayout
    from gpfm_engine.slide.reduced_levels import reduced_levels

    ndpi = [(3968, 4864), (1984, 2432), (992, 1216), (496, 608)]
    tiles = [TileLayout(w, 8, 1, h // 8, "jpeg") for w, h in ndpi]
    assert reduced_levels(ndpi, tiles) == [(0, 1), (1, 1), (2, 1), (3, 1), (3, 2), (3, 4), (3, 8)]
    # 4x spacing: the gaps are filled by 1/2 of the level above; a 12-px-high tile cannot do 1/8
    dims = [(4096, 4096), (1024, 1024)]
    layouts = [TileLayout(512, 12, 8, 342, "jpeg"), TileLayout(512, 12, 2, 86, "jpeg")]
    assert reduced_levels(dims, layouts) == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 4)]
    assert reduced_levels(dims, [layout._replace(compression="lzw") for layout in layouts]) == [(0, 1), (1, 1)]


def test_reduced_levels_of_a_synthesized_hamamatsu_layout(slide_factory, monkeypatch):
    """Without real data: a tiled JPEG pyramid read as Hamamatsu gains OpenSlide's 1/2, 1/4, 1/8
    levels of its smallest stored level; their pixels equal OpenCV's reduced decode (libjpeg DCT
    scaling) of the stored tiles (<= 2) and the part of a tile beyond the level's edge is white."""
    import cv2

    from gpfm_engine.slide import tiff

    def as_hamamatsu(tf, page0):
        meta = read_metadata(tf, page0)
        meta.vendor = "hamamatsu"
        return meta

    read_metadata = tiff.read_metadata
    monkeypatch.setattr(tiff, "read_metadata", as_hamamatsu)
    path = make(slide_factory, "tiff", "jpeg")  # stored 517x389, 258x194, 129x97 on 128-px tiles
    reduce_flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    with open_slide(path, backend="tiff") as slide:
        assert slide.level_dimensions == ((517, 389), (258, 194), (129, 97), (64, 48), (32, 24), (16, 12))
        stored = slide.tile_layout(2)
        streams = slide.read_raw_tiles(2, range(stored.count))
        for level, denom in ((3, 2), (4, 4), (5, 8)):
            layout = slide.tile_layout(level)
            assert layout == (128 // denom, 128 // denom, stored.columns, stored.rows, f"jpeg/{denom}")
            tiles = [cv2.cvtColor(cv2.imdecode(np.frombuffer(s, np.uint8), reduce_flags[denom]), cv2.COLOR_BGR2RGB)
                     for s in streams]
            mosaic = np.concatenate(tiles, axis=1)  # one row of stored tiles
            width, height = slide.level_dimensions[level]
            ours = slide.read_region((0, 0), level, (width, height))
            assert np.abs(ours.astype(int) - mosaic[:height, :width]).max() <= 2
            first, beyond = slide.read_tiles(level, [0, 1])  # tile 1 starts at the level's right edge
            assert first.shape == beyond.shape == (layout.tile_height, layout.tile_width, 3)
            assert (first[height:] == 255).all() and (beyond == 255).all()
            assert np.abs(first[:height].astype(int) - mosaic[:height, : layout.tile_width]).max() <= 2
