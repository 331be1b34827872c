"""The slide factory writes what it claims: formats, compressions, pyramids, physical size."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from gpfm_engine import synth


@pytest.mark.parametrize("fmt", synth.FORMATS)
@pytest.mark.parametrize("compression", synth.COMPRESSIONS)
def test_every_format_and_compression_round_trips(slide_factory, fmt: str, compression: str) -> None:
    path = slide_factory(size=(700, 520), fmt=fmt, compression=compression, mpp=0.5, tile=240)
    expected = synth.TissuePattern(700, 520, 0.5).render(0, 0, 700, 520)
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        assert len(series.levels) >= 2
        level0 = series.levels[0].asarray()
        page = series.levels[0].pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (240, 240)
        if compression in ("jpeg", "jpeg_rgb"):
            assert page.jpegtables is not None  # abbreviated tiles with shared tables
    tol = {"jpeg": 40, "jpeg_rgb": 20, "jpeg2000": 8}.get(compression, 0)
    assert np.abs(level0.astype(int) - expected).max() <= tol


def test_aperio_rgb_tiles_need_the_colour_fix(slide_factory) -> None:
    import imagecodecs

    path = slide_factory(size=(480, 480), fmt="svs", compression="jpeg_rgb", mpp=0.5)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        assert page.photometric == 2
        fh = tf.filehandle
        fh.seek(page.dataoffsets[0])
        tile = fh.read(page.databytecounts[0])
        spliced = page.jpegtables[:-2] + tile[2:]
    truth = synth.TissuePattern(480, 480, 0.5).render(0, 0, 240, 240)
    naive = imagecodecs.jpeg8_decode(spliced)  # decoder assumes YCbCr: wrong colours
    assert np.abs(naive.astype(int) - truth).max() > 60


def test_tissue_is_on_background() -> None:
    img = synth.TissuePattern(2000, 1500, 0.5, seed=3).render(0, 0, 500, 375, downsample=4)
    sat = img.max(-1).astype(int) - img.min(-1)
    assert 0.1 < (sat > 40).mean() < 0.9  # tissue and glass both present
    empty = synth.TissuePattern(2000, 1500, 0.5, coverage=0).render(0, 0, 200, 150, downsample=10)
    assert (empty.max(-1).astype(int) - empty.min(-1)).max() < 20


def test_svs_metadata(slide_factory) -> None:
    path = slide_factory(size=(1000, 800), fmt="svs", compression="jpeg", mpp=0.2528, objective=40)
    with tifffile.TiffFile(path) as tf:
        desc = tf.pages[0].description
        assert desc.startswith("Aperio") and "MPP = 0.2528" in desc and "AppMag = 40" in desc
        kinds = [p.description.splitlines()[-1].split()[0] for p in tf.pages if not p.is_tiled]
        assert "label" in kinds and "macro" in kinds
