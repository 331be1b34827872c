"""What ``gpfm-engine info SLIDE`` reports: a slide as plain data, and as a table for people."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table


def describe_slide(path: str | Path, backend: str | None = None, mpp: float | None = None) -> dict[str, Any]:
    """Vendor, backend, physical units, levels and associated images of one slide (JSON-ready).

    Raises ``SlideError`` (one line naming the file and cause) when the slide cannot be opened.
    """
    from gpfm_engine.slide import open_slide

    with open_slide(path, backend=backend, mpp=mpp) as slide:
        levels = []
        for level, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples)):
            layout = slide.tile_layout(level)
            level_mpp = slide.level_mpp(level)
            levels.append({
                "level": level, "width": w, "height": h, "downsample": ds,
                "mpp": list(level_mpp) if level_mpp else None,
                "tile_width": layout.tile_width, "tile_height": layout.tile_height,
                "compression": layout.compression,
            })
        return {
            "path": str(slide.path),
            "vendor": slide.vendor,
            "backend": slide.backend,
            "dimensions": list(slide.dimensions),
            "mpp": list(slide.mpp) if slide.mpp else None,
            "mpp_source": slide.mpp_source,
            "objective_power": slide.objective_power,
            "levels": levels,
            "associated_images": {name: list(size) for name, size in slide.associated_images.sizes.items()},
        }


def description_table(info: dict[str, Any]) -> Table:
    """A rich table of :func:`describe_slide`'s result."""
    mpp = info["mpp"]
    mpp_text = f"{mpp[0]:.4f} x {mpp[1]:.4f} µm/px ({info['mpp_source']})" if mpp else "unknown"
    power = info["objective_power"]
    associated = ", ".join(f"{n} {w}x{h}" for n, (w, h) in info["associated_images"].items()) or "none"
    caption = f"mpp {mpp_text} · objective {f'{power:g}x' if power else 'unknown'} · associated: {associated}"
    title = f"{info['path']}  ({info['vendor']}, backend {info['backend']})"
    table = Table(title=escape(title), caption=escape(caption))
    for column in ("level", "size", "downsample", "µm/px", "tile", "compression"):
        table.add_column(column, justify="right" if column != "compression" else "left")
    for lv in info["levels"]:
        table.add_row(str(lv["level"]), f"{lv['width']}x{lv['height']}", f"{lv['downsample']:.4g}",
                      f"{lv['mpp'][0]:.4f}" if lv["mpp"] else "-", f"{lv['tile_width']}x{lv['tile_height']}",
                      lv["compression"])
    return table
