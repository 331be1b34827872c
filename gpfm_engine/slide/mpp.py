"""Physical pixel size (micrometres per pixel) from slide metadata, or None, never a guess.

Patch geometry is defined in micrometres, so a wrong mpp silently changes every feature. Each
parser returns ``(x, y)`` in µm/px at level 0 only when the metadata states it with a unit; all of
them pass :func:`plausible`, which rejects the classic 72/96-dpi screen-resolution defaults that
image libraries write into TIFFs (72 dpi = 352.8 µm/px): no slide scanner works above 50 µm/px.
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Mapping

MPP = tuple[float, float]

MAX_PLAUSIBLE_MPP = 50.0

# TIFF ResolutionUnit -> micrometres per unit (1 = no absolute unit: unknown)
_RESOLUTION_UNIT_UM = {2: 25_400.0, 3: 10_000.0}

# OME UnitsLength symbols -> micrometres
_OME_UNIT_UM = {
    "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6,
    "Å": 1e-4, "in": 25_400.0, "mi": 1.609344e9, "ft": 304_800.0, "yd": 914_400.0, "pt": 25_400.0 / 72,
}


def plausible(mpp: MPP | None) -> MPP | None:
    """``mpp`` if both values are finite, positive and at most :data:`MAX_PLAUSIBLE_MPP`."""
    if mpp is None:
        return None
    x, y = mpp
    if all(math.isfinite(v) and 0.0 < v <= MAX_PLAUSIBLE_MPP for v in (x, y)):
        return (float(x), float(y))
    return None


def from_aperio(description: str) -> MPP | None:
    """Aperio ImageDescription ``|MPP = 0.4990|`` (square pixels)."""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if not match:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    return plausible((value, value))


def from_tiff_resolution(xres: float | None, yres: float | None, unit: int | None) -> MPP | None:
    """X/YResolution (pixels per unit) with ResolutionUnit centimetre (3) or inch (2).

    A missing ResolutionUnit tag means "inch" in the TIFF spec, but writers that omit it rarely
    meant anything physical: unknown, like unit 1 (none).
    """
    per_unit_um = _RESOLUTION_UNIT_UM.get(unit) if unit is not None else None
    if per_unit_um is None or not xres or not yres:
        return None
    return plausible((per_unit_um / xres, per_unit_um / yres))


def from_ome(xml: str) -> MPP | None:
    """PhysicalSizeX/Y of the first OME Image's Pixels, converted from their units (default µm)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        scale = _OME_UNIT_UM.get(unit)
        if value is None or scale is None:
            return None
        try:
            sizes.append(float(value) * scale)
        except ValueError:
            return None
    return plausible((sizes[0], sizes[1]))


def from_openslide(properties: Mapping[str, str]) -> MPP | None:
    """OpenSlide's normalized ``openslide.mpp-x`` / ``openslide.mpp-y`` properties."""
    try:
        return plausible((float(properties["openslide.mpp-x"]), float(properties["openslide.mpp-y"])))
    except (KeyError, ValueError):
        return None
