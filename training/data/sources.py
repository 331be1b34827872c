"""Where training tiles come from: whole-slide images (read on demand through a tissue grid),
image folders, and synthesized slides (written once with ``gpfm_engine.synth``, then read like
any slide). Nothing is pre-extracted: a tile is a (source, index) pair resolved at load time.

Slide handles are opened lazily in the process that reads (each DataLoader worker has its own),
never inherited across a fork.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from gpfm_engine import synth
from gpfm_engine.errors import SlideError
from gpfm_engine.grid import GridParams, make_grid
from gpfm_engine.slide import Slide, open_slide

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class TileSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def read(self, index: int) -> Image.Image: ...


@dataclass
class SlideSource:
    """Patches of ``fov_um`` on the engine's tissue grid (``gpfm_engine.grid.make_grid``) of one
    slide, read through ``gpfm_engine.open_slide`` at the grid's read level and returned at
    ``tile_px`` (bicubic), i.e. at ``fov_um / tile_px`` µm per pixel."""

    path: Path
    fov_um: float
    tile_px: int
    min_tissue: float = 0.5
    overlap: float = 0.0
    mpp: float | None = None
    name: str = ""
    coords: np.ndarray = field(init=False)
    _slide: Slide | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name
        params = GridParams(fov_um=self.fov_um, overlap=self.overlap, threshold=self.min_tissue, target_size=self.tile_px)
        with open_slide(self.path, mpp=self.mpp) as slide:
            grid = make_grid(slide, params=params, mpp=self.mpp)
        self.coords, self.read_level = grid.coords, grid.read_level
        self.read_size = max(1, round(grid.patch_size_read))

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_slide"] = None  # each process opens its own handle
        return state

    def read(self, index: int) -> Image.Image:
        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.mpp)
        x, y = (int(v) for v in self.coords[index])
        img = Image.fromarray(self._slide.read_region((x, y), self.read_level, (self.read_size, self.read_size)))
        if img.size != (self.tile_px, self.tile_px):
            img = img.resize((self.tile_px, self.tile_px), Image.Resampling.BICUBIC)
        return img


@dataclass
class ImageFolderSource:
    """Every image file under ``root`` (recursive, sorted paths), at its own size."""

    root: Path
    name: str = ""
    paths: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.name or str(self.root)
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SlideError(self.root, "no image files in folder")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as im:
            return im.convert("RGB")


def synthesize_slides(out_dir: Path, count: int, size: Sequence[int], mpp: float, seed: int) -> list[Path]:
    """``count`` synthesized SVS slides (seeds ``seed``..), reused when already on disk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"synth_{seed + i}_{size[0]}x{size[1]}_{mpp}.svs"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.tmp.svs")  # never shared by two writers
            synth.write_slide(tmp, size=tuple(size), mpp=mpp, seed=seed + i, fmt="svs", compression="jpeg")
            tmp.rename(path)
        paths.append(path)
    return paths


class TileCatalog:
    """All sources behind one flat index ``0..len-1`` (source order, then tile order)."""

    def __init__(self, sources: Sequence[TileSource]) -> None:
        self.sources = [s for s in sources if len(s) > 0]
        for s in sources:
            if len(s) == 0:
                log.warning("%s: no tiles (no tissue on the grid?), skipped", s.name)
        if not self.sources:
            raise SlideError("<training data>", "no tiles in any configured source")
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, index: int) -> Image.Image:
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.sources[k].read(index - int(self.offsets[k]))

    def summary(self) -> list[dict]:
        return [{"name": s.name, "tiles": len(s)} for s in self.sources]


def build_catalog(data_cfg: dict, cache_dir: Path) -> TileCatalog:
    """Sources from the ``data`` config block: slide globs, image folders, synthesized slides."""
    sources: list[TileSource] = []
    slide_paths = sorted({Path(p) for pattern in data_cfg["slides"] for p in glob.glob(str(pattern), recursive=True)})
    syn = data_cfg["synth"]
    if syn["count"] > 0:
        slide_paths += synthesize_slides(cache_dir / "synth", syn["count"], syn["size"], syn["mpp"], syn["seed"])
    for path in slide_paths:
        sources.append(SlideSource(path, data_cfg["fov_um"], data_cfg["tile_px"], data_cfg["min_tissue"],
                                   data_cfg["overlap"], data_cfg["mpp"]))
    sources += [ImageFolderSource(Path(root)) for root in data_cfg["image_folders"]]
    return TileCatalog(sources)
