"""Physical pixel size parsers: stated units only, implausible values rejected, never a guess."""
from __future__ import annotations

import pytest

from gpfm_engine.slide import mpp


def test_aperio():
    desc = "Aperio Image Library v11.2.1 \r\n46000x32914 (240x240) JPEG/RGB Q=30|AppMag = 20|MPP = 0.4990|Left = 25"
    assert mpp.from_aperio(desc) == (0.499, 0.499)
    assert mpp.from_aperio("Aperio Image Library|AppMag = 20") is None
    assert mpp.from_aperio("Aperio|MPP = abc") is None


@pytest.mark.parametrize(
    "xres, yres, unit, expected",
    [
        (40000.0, 40000.0, 3, (0.25, 0.25)),  # pixels per centimetre
        (101600.0, 50800.0, 2, (0.25, 0.5)),  # pixels per inch, non-square
        (43826.0, 43826.0, 3, (10000 / 43826, 10000 / 43826)),  # NDPI
        (72.0, 72.0, 2, None),  # the 72-dpi trap: 352.8 µm/px
        (28.35, 28.35, 3, None),  # 72 dpi written in centimetres
        (40000.0, 40000.0, 1, None),  # ResolutionUnit none
        (40000.0, 40000.0, None, None),  # ResolutionUnit missing: not trusted
        (None, 40000.0, 3, None),
        (0.0, 0.0, 3, None),
    ],
)
def test_tiff_resolution(xres, yres, unit, expected):
    got = mpp.from_tiff_resolution(xres, yres, unit)
    assert got == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(
    "attrs, expected",
    [
        ('PhysicalSizeX="0.25" PhysicalSizeY="0.26"', (0.25, 0.26)),  # default unit µm
        ('PhysicalSizeX="0.25" PhysicalSizeXUnit="µm" PhysicalSizeY="0.25" PhysicalSizeYUnit="µm"', (0.25, 0.25)),
        ('PhysicalSizeX="250" PhysicalSizeXUnit="nm" PhysicalSizeY="250" PhysicalSizeYUnit="nm"', (0.25, 0.25)),
        ('PhysicalSizeX="0.00025" PhysicalSizeXUnit="mm" PhysicalSizeY="0.00025" PhysicalSizeYUnit="mm"', (0.25, 0.25)),
        ('PhysicalSizeX="0.25" PhysicalSizeXUnit="parsec" PhysicalSizeY="0.25"', None),  # unknown unit
        ('PhysicalSizeX="0.25"', None),  # Y missing
        ("", None),
    ],
)
def test_ome(attrs, expected):
    xml = (f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
           f'<Pixels ID="Pixels:0" SizeX="10" SizeY="10" {attrs}/></Image></OME>')
    got = mpp.from_ome(xml)
    assert got == (pytest.approx(expected) if expected else None)
    assert mpp.from_ome("<not xml") is None


def test_openslide_properties():
    assert mpp.from_openslide({"openslide.mpp-x": "0.2281", "openslide.mpp-y": "0.2282"}) == (0.2281, 0.2282)
    assert mpp.from_openslide({"openslide.mpp-x": "352.77", "openslide.mpp-y": "352.77"}) is None
    assert mpp.from_openslide({"openslide.mpp-x": "0.25"}) is None


def test_plausible_bounds():
    assert mpp.plausible((50.0, 0.1)) == (50.0, 0.1)
    for bad in [(50.01, 0.25), (0.0, 0.25), (-0.25, 0.25), (float("nan"), 0.25), (float("inf"), 0.25)]:
        assert mpp.plausible(bad) is None
