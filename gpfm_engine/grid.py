"""Patch coordinates in micrometre-exact geometry.

A patch covers ``fov_um`` micrometres (GPFM default 128 µm: the authors' 512 px at 0.25 µm/px) and
is resampled to the model input (``target_size`` px), so the target resolution is
``fov_um / target_size`` µm/px. Patches are read from the coarsest level that is still at least that
fine (never upsampled from a coarser level). Positions step by ``fov_um * (1 - overlap)`` from the
level-0 origin, in row-major order, and may cross the right and bottom edges (outside is white
background). A patch is kept when its tissue fraction, measured on the :class:`TissueMask`, is at
least ``threshold``.

``mag`` + ``patch_size`` is accepted as sugar for the field of view, with the usual convention
that magnification M means 10/M µm/px (40x = 0.25, 20x = 0.5): ``fov_um = patch_size * 10 / mag``.
Level-0 sizes always come from the slide's measured mpp, so a 0.263 µm/px scan asked for 20x/512
reads 973 level-0 pixels, not the 1024 a nominal 40x would give.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpfm_engine import _core
from gpfm_engine.tissue import (LEVEL_MPP_TOLERANCE, TissueMask, finest_level_at_most, segment_tissue, slide_mpp,
                                slide_path)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridParams:
    """Patch geometry. ``overlap`` is a fraction of the patch (0 <= overlap < 1)."""

    fov_um: float = 128.0
    overlap: float = 0.0
    threshold: float = 0.25
    target_size: int = 224
    mag: float | None = None
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if (self.mag is None) != (self.patch_size is None):
            raise ValueError("mag and patch_size go together (patch_size pixels at magnification mag)")
        if self.mag is not None and not (self.mag > 0 and self.patch_size > 0):
            raise ValueError(f"mag and patch_size must be positive, got {self.mag!r} and {self.patch_size!r}")
        if not self.resolved_fov_um > 0:
            raise ValueError(f"fov_um must be positive, got {self.resolved_fov_um!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap is a fraction of the patch in [0, 1), got {self.overlap!r}")
        if self.target_size < 1:
            raise ValueError(f"target_size must be a positive pixel count, got {self.target_size!r}")

    @property
    def resolved_fov_um(self) -> float:
        """The field of view in µm: ``fov_um``, or ``patch_size * 10 / mag`` when those are given."""
        return self.patch_size * 10.0 / self.mag if self.mag is not None else float(self.fov_um)


@dataclass
class PatchGrid:
    """Kept patches of one slide and the geometry they were made with.

    ``coords`` are int64 [N, 2] level-0 (x, y) top-left corners, row-major; ``tissue_fraction`` is
    float32 [N]. ``patch_size_level0`` is the exact size in level-0 pixels and
    ``patch_size_level0_int`` the rounded size that is actually read; ``patch_size_read`` is that
    size in pixels of ``read_level``. ``mpp_effective`` is the µm/px of the model input as read
    (rounded patch); ``empty_reason`` says why a grid has no patches. Not frozen, like
    :class:`TissueMask`: a frozen dataclass sets its 16 fields through ``object.__setattr__``, which
    doubled the cost of building one (measured cold, ~17 µs of a small slide's ~0.2 ms mask + grid).
    """

    coords: np.ndarray
    tissue_fraction: np.ndarray
    read_level: int
    patch_size_level0: float
    patch_size_level0_int: int
    patch_size_read: float
    stride_level0: float
    mpp_level0: float
    mpp_target: float
    mpp_effective: float
    fov_um: float
    overlap: float
    threshold: float
    target_size: int
    level0_size: tuple[int, int]
    empty_reason: str = ""

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def fov_um_effective(self) -> float:
        """Micrometres actually covered by one patch (the rounded level-0 size)."""
        return self.patch_size_level0_int * self.mpp_level0


def candidate_coords(width: int, height: int, stride: float) -> np.ndarray:
    """Row-major level-0 top-lefts ``round(i * stride)`` that start inside the image, int64 [N, 2]."""
    xs = np.round(np.arange(math.ceil(width / stride)) * stride).astype(np.int64)
    ys = np.round(np.arange(math.ceil(height / stride)) * stride).astype(np.int64)
    xs, ys = xs[xs < width], ys[ys < height]
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def make_grid(slide: Any, mask: TissueMask | None = None, params: GridParams | None = None, *,
              mpp: float | None = None) -> PatchGrid:
    """Patch coordinates of ``slide`` whose tissue fraction (on ``mask``) is >= ``params.threshold``.

    ``mask`` defaults to :func:`segment_tissue` of the slide; ``mpp`` overrides the slide's µm per
    level-0 pixel, and a slide without one is refused with a ``SlideError``.
    """
    params = params or GridParams()
    mpp0 = slide_mpp(slide, mpp)
    fov = params.resolved_fov_um
    target_mpp = fov / params.target_size
    if abs(mpp0[0] - mpp0[1]) > 0.01 * mpp0[0]:
        logger.warning("%s: pixels are not square (%.4f x %.4f µm); patches are square in x units",
                       slide_path(slide), mpp0[0], mpp0[1])
    if mpp0[0] > target_mpp * (1 + LEVEL_MPP_TOLERANCE):
        logger.warning("%s: level 0 (%.3f µm/px) is coarser than the model input (%.3f µm/px): patches are "
                       "upsampled", slide_path(slide), mpp0[0], target_mpp)
    size = fov / mpp0[0]
    size_int = max(1, round(size))
    level = finest_level_at_most(slide, target_mpp, mpp0)
    stride = size * (1.0 - params.overlap)
    dims = slide.level_dimensions
    width, height = dims[0]
    geometry = dict(
        read_level=level,
        patch_size_level0=size,
        patch_size_level0_int=size_int,
        patch_size_read=size_int * dims[level][0] / width,  # the read level's width ratio to level 0
        stride_level0=stride,
        mpp_level0=mpp0[0],
        mpp_target=target_mpp,
        mpp_effective=size_int * mpp0[0] / params.target_size,
        fov_um=fov,
        overlap=params.overlap,
        threshold=params.threshold,
        target_size=params.target_size,
        level0_size=(width, height),
    )
    if width < size_int or height < size_int:
        reason = f"the slide ({width}x{height} px) is smaller than one patch ({size_int} px = {fov:g} µm)"
        return _empty(slide, geometry, reason)
    if mask is None:
        mask = segment_tissue(slide, mpp=mpp)
    coords, fraction = kept_patches(mask, width, height, stride, size_int, params.threshold)
    if not len(coords):
        reason = ("no tissue found" if mask.integral[-1, -1] == 0
                  else f"no patch reaches the tissue threshold {params.threshold:g}")
        return _empty(slide, geometry, reason)
    return PatchGrid(coords=coords, tissue_fraction=fraction, **geometry)


def kept_patches(mask: TissueMask, width: int, height: int, stride: float, size: int,
                 threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The :func:`candidate_coords` whose ``mask.fractions`` is >= ``threshold`` (int64 [N, 2]) and
    those fractions (float32 [N]), in one compiled pass over the lattice: per-candidate NumPy work
    would cost more than segmenting a small thumbnail."""
    return _core.patch_grid(mask.integral, width, height, stride, size, mask.scale[0], mask.scale[1], threshold)


def _empty(slide: Any, geometry: dict, reason: str) -> PatchGrid:
    logger.warning("%s: zero patches: %s", slide_path(slide), reason)
    return PatchGrid(coords=np.zeros((0, 2), np.int64), tissue_fraction=np.zeros(0, np.float32),
                     empty_reason=reason, **geometry)
