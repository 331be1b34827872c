"""Patch gather: decoded stored tiles -> the model's normalized input, in one kernel pass.

The kernel (``_core.gather``, CPU and CUDA launchers over ``csrc/include/gpfm/resample.h``) crops
each patch out of the stored tiles of the read level, resizes it exactly as PIL's
``Image.resize((S, S), Image.BICUBIC)`` does (antialiased when shrinking, bit-identical uint8),
normalizes with the model's mean/std and writes NCHW float32/float16/bfloat16 straight into the
caller's buffer (the backend's input).

Geometry rule (what the reference ``read_region`` → PIL path sees):

- the source of a patch is the ``P x P`` region at the read level, ``P = floor(patch_size_read +
  0.5)`` (the grid's ``patch_size_read`` is already the rounded level-0 size divided by the level's
  downsample, so this only removes float noise), i.e. what ``read_region(coord, read_level, (P, P))``
  returns;
- its top-left is ``floor(coord / downsample + 0.5)`` at the read level. At level 0 this is the
  coordinate itself. At levels above 0, OpenSlide instead translates by the fractional remainder
  with cairo (subpixel interpolation, openslide/openslide#641), which no reader of stored tiles
  reproduces; rounding to the nearest pixel is the closest integer-grid choice;
- pixels outside the level are white (255), as OpenSlide's transparent pixels composited on white.

Tiles are passed as a list of ``[th, tw, 3]`` arrays in ``plan.tile_indices`` order, which the
kernel reads through a pointer table (no stacking copy; the arrays ``Slide.read_tiles`` returns
from its cache are used as they are), or as one stacked ``[T, th, tw, 3]`` array/tensor (required
on CUDA, where decoders produce a stacked tensor anyway).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from gpfm_engine import _core
from gpfm_engine.cuda_stream import to_device
from gpfm_engine.kernels import current_stream

WHITE_LEVEL = 220  # a resampled pixel with all channels >= this counts as background (glass)


class TileGrid(Protocol):
    """What the gather needs of a level's ``TileLayout``: tile size and grid size."""

    tile_width: int
    tile_height: int
    columns: int
    rows: int


@dataclass(frozen=True)
class GatherPlan:
    """Where the pixels of a batch of patches are, in the stored-tile grid of the read level.

    ``tile_indices``: int64 [T], the sorted unique level tile indices (``row * columns + column``)
    the batch touches: read these (``slide.read_tiles(level, plan.tile_indices)``) and pass them to
    ``PatchGather.run`` in this order. ``lut``: int32 [N, rows, cols], per patch the positions into
    ``tile_indices`` of the tiles covering its frame (-1: outside the level, white). ``rects``:
    int32 [N, 4], the source origin (x, y) in that frame and the frame's valid width and height
    (pixels past them are beyond the level). ``read_origins``: int64 [N, 2], the source origin at
    the read level.
    """

    tile_indices: np.ndarray
    lut: np.ndarray
    rects: np.ndarray
    read_origins: np.ndarray

    @property
    def origins(self) -> np.ndarray:
        """int32 [N, 2]: each patch's source origin in its lut frame."""
        return self.rects[:, :2]

    def __len__(self) -> int:
        return len(self.rects)


def read_size(patch_size_read: float) -> int:
    """The integer side (px at the read level) of the region a patch is resized from."""
    size = math.floor(float(patch_size_read) + 0.5)
    if size < 1:
        raise ValueError(f"patch_size_read must be >= 0.5 px, got {patch_size_read}")
    return size


class PatchGather:
    """The gather kernel set up for one slide level, patch size and model input.

    ``plan(coords_level0, downsample)`` maps level-0 top-left coordinates to tiles; ``run(tiles,
    plan, out)`` fills ``out`` ([N, 3, out_size, out_size], ``dtype``, on the tiles' device).
    ``level_size`` (width, height of the read level) makes pixels past the level's edge white even
    when the decoded edge tiles are not padded with white; by default the whole tile grid is image.
    """

    def __init__(self, layout: TileGrid, read_level: int, patch_size_read: float, out_size: int,
                 mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32, *,
                 level_size: tuple[int, int] | None = None, white_level: int = WHITE_LEVEL) -> None:
        if out_size < 1:
            raise ValueError(f"out_size must be >= 1, got {out_size}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.layout = layout
        self.read_level = int(read_level)
        self.src_size = read_size(patch_size_read)
        self.out_size = int(out_size)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        self.dtype = dtype
        self.white_level = int(white_level)
        tw, th = int(layout.tile_width), int(layout.tile_height)
        self.level_size = level_size or (layout.columns * tw, layout.rows * th)
        # tiles one patch can touch along each axis, wherever it starts
        self._span = ((self.src_size + tw - 2) // tw + 1, (self.src_size + th - 2) // th + 1)

    def plan(self, coords_level0: np.ndarray, downsample: float) -> GatherPlan:
        """The tiles and per-patch lookup of a batch of level-0 top-left coordinates ([N, 2])."""
        coords = np.asarray(coords_level0, dtype=np.float64).reshape(-1, 2)
        origin = np.floor(coords / float(downsample) + 0.5).astype(np.int64)
        tw, th = int(self.layout.tile_width), int(self.layout.tile_height)
        first = origin // np.array([tw, th])                                  # first tile column, row
        cols = first[:, 0, None] + np.arange(self._span[0])                    # [N, ncols]
        rows = first[:, 1, None] + np.arange(self._span[1])                    # [N, nrows]
        inside = ((rows >= 0) & (rows < self.layout.rows))[:, :, None] & \
                 ((cols >= 0) & (cols < self.layout.columns))[:, None, :]
        flat = rows[:, :, None] * self.layout.columns + cols[:, None, :]
        tile_indices = np.unique(flat[inside])
        lut = np.where(inside, np.searchsorted(tile_indices, flat), -1).astype(np.int32)
        frame0 = first * np.array([tw, th])
        limits = np.array(self.level_size, dtype=np.int64) - frame0
        rects = np.concatenate([origin - frame0, np.clip(limits, -2**31, 2**31 - 1)], axis=1).astype(np.int32)
        return GatherPlan(tile_indices.astype(np.int64), np.ascontiguousarray(lut), rects, origin)

    def run(self, tiles: Sequence[Any] | np.ndarray | torch.Tensor, plan: GatherPlan, out: torch.Tensor,
            background: torch.Tensor | None = None) -> torch.Tensor:
        """Fill ``out`` with the normalized patches of ``plan`` and return it.

        ``tiles``: the decoded tiles of ``plan.tile_indices`` (list of host arrays or one stacked
        array/tensor). ``background`` (float32 [N], optional) receives each patch's fraction of
        near-white resampled pixels, computed in the same pass. CUDA tensors run on torch's current
        stream without synchronising.
        """
        n_tiles = len(tiles)
        if n_tiles != len(plan.tile_indices):
            raise ValueError(f"gather: got {n_tiles} tiles for a plan of {len(plan.tile_indices)}")
        device = out.device
        lut, rects = _on(plan.lut, device), _on(plan.rects, device)
        _core.gather(tiles, lut, rects, out, int(self.layout.tile_height), int(self.layout.tile_width),
                     self.src_size, self.src_size, self.mean, self.std, background, self.white_level,
                     current_stream(out))
        return out

    def empty_batch(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised output buffer for ``n`` patches."""
        return torch.empty((n, 3, self.out_size, self.out_size), dtype=self.dtype, device=device)


def resample_images(images: np.ndarray | torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                    dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] images -> normalized [N, 3, size, size], resized as PIL's BICUBIC does.

    The same kernel with each image as its own tile; runs where the images live.
    """
    src = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if src.ndim == 3:
        src = src.unsqueeze(0)
    if src.ndim != 4 or src.shape[-1] != 3:
        raise ValueError(f"resample_images: expected uint8 [N, H, W, 3] images, got shape {tuple(src.shape)}")
    n, h, w, _ = src.shape
    if out is None:
        out = torch.empty((n, 3, size, size), dtype=dtype, device=src.device)
    lut = np.arange(n, dtype=np.int32).reshape(n, 1, 1)
    rects = np.tile(np.array([[0, 0, w, h]], dtype=np.int32), (n, 1))
    _core.gather(src, _on(lut, out.device), _on(rects, out.device), out, h, w, w, h, [float(v) for v in mean],
                 [float(v) for v in std], None, WHITE_LEVEL, current_stream(out))
    return out


def _on(array: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """The plan's host array as the kernel wants it on ``device``: host arrays stay as they are, CUDA
    gets a stream-ordered copy from pinned memory (``cuda_stream.to_device``: no host sync per batch)."""
    return array if device.type == "cpu" else to_device(array, device)
