"""What a TIFF-family slide says about itself: vendor, properties, mpp, objective, associated images.

Property names follow OpenSlide's (``tiff.*``, ``aperio.*``, ``hamamatsu.*``) so code written
against OpenSlide properties keeps working with the fast path.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import tifffile

from gpfm_engine.slide import mpp as mpp_parsers
from gpfm_engine.slide.mpp import MPP

# TIFF tags copied into properties as tiff.<Name>, like OpenSlide does
_TIFF_PROPERTY_TAGS = ("ImageDescription", "Make", "Model", "Software", "DateTime", "Artist", "HostComputer",
                       "Copyright", "DocumentName", "XResolution", "YResolution", "ResolutionUnit")
_RESOLUTION_UNIT_NAMES = {1: "none", 2: "inch", 3: "centimeter"}
# Series names tifffile gives associated images, as OpenSlide names them
_ASSOCIATED = {"thumbnail": "thumbnail", "label": "label", "macro": "macro"}


@dataclass
class TiffMetadata:
    """Everything the fast path reports about a slide besides its pixels."""

    vendor: str
    properties: dict[str, str] = field(default_factory=dict)
    mpp: MPP | None = None
    mpp_source: str | None = None
    objective_power: float | None = None
    associated: dict[str, tuple[int, tuple[int, int]]] = field(default_factory=dict)  # name -> (page, (w, h))


def vendor_of(tf: tifffile.TiffFile) -> str:
    """OpenSlide's vendor names where they exist; ``ome`` and ``generic-tiff`` otherwise."""
    if tf.is_svs:
        return "aperio"
    if tf.is_ndpi:
        return "hamamatsu"
    if tf.is_ome:
        return "ome"
    return "generic-tiff"


def read_metadata(tf: tifffile.TiffFile, page0: tifffile.TiffPage) -> TiffMetadata:
    """Collect the metadata of ``tf`` whose level 0 is ``page0``."""
    meta = TiffMetadata(vendor=vendor_of(tf))
    meta.properties.update(_tiff_properties(page0))
    description = page0.description or ""
    if meta.vendor == "aperio":
        fields = aperio_fields(description)
        meta.properties.update({f"aperio.{k}": v for k, v in fields.items()})
        meta.mpp = mpp_parsers.from_aperio(description)
        meta.mpp_source = "aperio" if meta.mpp else None
        meta.objective_power = _float(fields.get("AppMag"))
    elif meta.vendor == "hamamatsu":
        tags = page0.ndpi_tags or {}
        meta.properties.update({f"hamamatsu.{k}": str(v) for k, v in tags.items()
                                if isinstance(v, (str, int, float)) and k != "Comments"})
        meta.objective_power = _float(tags.get("Magnification"))
    elif meta.vendor == "ome":
        xml = tf.ome_metadata or ""
        meta.mpp = mpp_parsers.from_ome(xml)
        meta.mpp_source = "ome" if meta.mpp else None
        meta.objective_power = ome_objective(xml)
    if meta.mpp is None:
        meta.mpp = mpp_parsers.from_tiff_resolution(*_resolution(page0))
        meta.mpp_source = "tiff-resolution" if meta.mpp else None
    for name, page in associated_pages(tf).items():
        meta.associated[name] = (page.index, (int(page.imagewidth), int(page.imagelength)))
    return meta


def associated_pages(tf: tifffile.TiffFile) -> dict[str, tifffile.TiffPage]:
    """Label, macro and thumbnail pages, named as OpenSlide names them.

    Aperio (as OpenSlide reads it): an untiled page 1 is the thumbnail; other untiled pages name
    themselves on the second line of their ImageDescription. Elsewhere tifffile's series names.
    """
    found: dict[str, tifffile.TiffPage] = {}
    if tf.is_svs:
        for index, page in enumerate(tf.pages):
            if page.is_tiled:
                continue
            lines = (page.description or "").splitlines()
            words = lines[1].split() if len(lines) > 1 and lines[1].split() else [""]
            name = "thumbnail" if index == 1 else _ASSOCIATED.get(words[0].lower())
            if name and name not in found:
                found[name] = page
        return found
    for series in tf.series[1:]:
        name = _ASSOCIATED.get((series.name or "").lower())
        if name and name not in found and isinstance(series.keyframe, tifffile.TiffPage):
            found[name] = series.keyframe
    return found


def aperio_fields(description: str) -> dict[str, str]:
    """``key = value`` fields of an Aperio ImageDescription (after the first ``|``)."""
    fields = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def ome_objective(xml: str) -> float | None:
    """NominalMagnification of the first OME Objective, if any."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Objective":
            return _float(el.get("NominalMagnification"))
    return None


def _resolution(page: tifffile.TiffPage) -> tuple[float | None, float | None, int | None]:
    """(XResolution, YResolution, ResolutionUnit) as floats/int; None for absent tags."""
    def ratio(code: int) -> float | None:
        tag = page.tags.get(code)
        if tag is None:
            return None
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        return num / den if den else None

    unit = page.tags.get(296)
    return ratio(282), ratio(283), int(unit.value) if unit is not None else None


def _tiff_properties(page: tifffile.TiffPage) -> dict[str, str]:
    xres, yres, unit = _resolution(page)
    out = {}
    for name in _TIFF_PROPERTY_TAGS:
        if name == "XResolution" and xres is not None:
            out["tiff.XResolution"] = repr(xres)
        elif name == "YResolution" and yres is not None:
            out["tiff.YResolution"] = repr(yres)
        elif name == "ResolutionUnit" and unit is not None:
            out["tiff.ResolutionUnit"] = _RESOLUTION_UNIT_NAMES.get(unit, str(unit))
        elif name not in ("XResolution", "YResolution", "ResolutionUnit"):
            tag = page.tags.get(name)
            if tag is not None and isinstance(tag.value, (str, bytes)):
                value = tag.value.decode("latin-1") if isinstance(tag.value, bytes) else tag.value
                out[f"tiff.{name}"] = value
    return out


def _float(value: object) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
