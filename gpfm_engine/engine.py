"""The Python API: ``Engine`` turns slides (or tiles) into features.

::

    import gpfm_engine
    engine = gpfm_engine.Engine(model="gpfm", weights="GPFM.pth", device="auto")
    emb = engine.embed_slide("slide.svs")          # SlideEmbedding(features [N, D] on the device, coords, meta)
    for coords, feats in engine.iter_batches("slide.svs"):
        ...                                        # stream without holding a slide's features
    feats = engine.embed_tiles(uint8_nhwc_or_pil)  # any tiles, resampled like slide patches

The engine holds the configuration and the synchronous per-slide stages (open, tissue mask, patch
grid, gather set-up, recipe, output attributes); all concurrency lives in :mod:`gpfm_engine.pipeline`.
On CUDA the features stay CUDA tensors made by the backend on the engine stream (no host round
trip); they export through DLPack (``torch.utils.dlpack.to_dlpack`` / ``cupy.from_dlpack``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from gpfm_engine import __version__
from gpfm_engine.backends import choose_backend, torch_options
from gpfm_engine.cuda_stream import on_engine_stream, resolve_device
from gpfm_engine.errors import GpfmError, exception_summary
from gpfm_engine.gather import PatchGather
from gpfm_engine.grid import GridParams, make_grid
from gpfm_engine.models import get_model_cfg
from gpfm_engine.pipeline import embed_images, stream_slide
from gpfm_engine.slide import open_slide
from gpfm_engine.tissue import TissueParams, segment_tissue

log = logging.getLogger(__name__)

ON_TILE_ERROR = ("skip", "fail")


def default_workers() -> int:
    """Decode threads: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class SlideEmbedding:
    """Features of every kept patch of a slide, their level-0 top-left coords, and the geometry.

    ``features`` lives on the engine's device; ``coords`` is int64 [N, 2] on the host; ``meta``
    holds the same attributes the h5 output carries on ``coords`` (TRIDENT's and ours).
    """

    features: torch.Tensor
    coords: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class SlidePlan:
    """A slide made ready for extraction: the open slide, its tissue mask and its patch grid."""

    slide: Any
    grid: Any
    mask: Any
    layout: Any
    downsample: float
    seconds: float = 0.0

    @property
    def num_patches(self) -> int:
        return int(len(self.grid.coords))


class Engine:
    """Configured model + geometry; see the module docstring.

    Geometry keywords (``**geometry``) are the patch grid's parameters (``fov_um``, or ``mag`` with
    ``patch_size``; ``overlap``; ``tissue_threshold``, the minimum tissue fraction of a kept patch),
    with the model's own field of view as the default. ``tissue`` takes the tissue masker's
    parameters. ``mpp`` overrides the µm/px of every slide (for slides without trustworthy
    metadata). ``decoder`` picks the GPU tile decoder on CUDA ("auto", "cpu" or a plug-in name).
    ``compile`` and ``cuda_graphs`` (torch backend; ``None`` = on for CUDA, off for CPU) run the
    model through ``torch.compile`` and replay captured CUDA graphs; batches are then padded up to
    fixed buckets derived from ``batch_size`` (see ``backends.torch_options``). ``backend_options``
    go to the backend as they are, over those (e.g. torch ``buckets``, ``compile_mode``; onnx
    ``threads``; tensorrt ``profile``).
    The backend is created on first use, so planning (``plan``, ``--dry-run``) never loads weights.
    """

    def __init__(
        self,
        model: str = "gpfm",
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        backend: str = "auto",
        precision: str | None = None,
        batch_size: int = 64,
        workers: int | None = None,
        on_tile_error: str = "skip",
        decoder: str = "auto",
        compile: bool | None = None,
        cuda_graphs: bool | None = None,
        backend_options: dict[str, Any] | None = None,
        tissue: Any = None,
        mpp: float | None = None,
        **geometry: Any,
    ) -> None:
        if on_tile_error not in ON_TILE_ERROR:
            raise ValueError(f"on_tile_error must be one of {ON_TILE_ERROR}, got {on_tile_error!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.cfg = get_model_cfg(model)
        self.weights = weights
        self.device = resolve_device(device)
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        # resolved once here: the options below depend on it, and the backend is created from it
        self.backend_name = choose_backend(self.device, self.precision) if backend == "auto" else backend
        self.batch_size = int(batch_size)
        self.workers = int(workers or default_workers())
        self.on_tile_error = on_tile_error
        self.mpp = mpp
        self.decoder_name = decoder
        self._gpu_decoder: Any = None
        options = torch_options(self.device, self.backend_name, self.batch_size, compile, cuda_graphs)
        self.backend_options = dict(options, **(backend_options or {}))
        self._compile_requested = bool(compile or cuda_graphs)  # explicit: a failure is an error, not a fallback
        geometry = {k: v for k, v in geometry.items() if v is not None}
        if "tissue_threshold" in geometry:
            geometry["threshold"] = geometry.pop("tissue_threshold")
        geometry.setdefault("fov_um", self.cfg.fov_um)
        self.grid_params = GridParams(target_size=self.cfg.input_size, **geometry)
        if tissue is None:
            tissue = TissueParams()
        elif isinstance(tissue, dict):
            tissue = TissueParams(**tissue)
        self.tissue_params = tissue
        self._backend = None
        self._backend_lock = threading.Lock()

    # ------------------------------------------------------------------ model side
    @property
    def backend(self):
        """The inference backend, created (weights loaded, buckets compiled) on first use, once even
        when the pipeline's threads ask at the same time (the recipe needs its weights hash)."""
        with self._backend_lock:
            if self._backend is None:
                from gpfm_engine.backends import create_backend

                backend = create_backend(self.backend_name, self.model_name, weights=self.weights,
                                         device=str(self.device), precision=self.precision, **self.backend_options)
                if getattr(backend, "buckets", None):
                    self._warm_up(backend)
                self._backend = backend
        return self._backend

    def _warm_up(self, backend: Any) -> None:
        """Compile and capture the torch backend's buckets before any slide; when that fails and
        compilation was only the CUDA default, fall back to the eager model with a warning."""
        t0 = time.perf_counter()
        try:
            with on_engine_stream(self.device):
                backend.warmup()
        except Exception as exc:  # noqa: BLE001 - inductor/Triton/graph-capture failures have many types
            line = exception_summary(exc)
            if self._compile_requested:
                raise GpfmError(f"torch.compile / CUDA graphs of {self.model_name} failed: {line}") from exc
            log.warning("torch.compile / CUDA graphs of %s failed (%s); running the model eagerly", self.model_name, line)
            backend.use_eager()
            return
        log.info("%s: buckets %s compiled=%s cuda_graphs=%s ready in %.1f s", self.model_name, list(backend.buckets),
                 backend.compiled, backend.cuda_graphs, time.perf_counter() - t0)

    @property
    def gpu_decoder(self):
        """The GPU tile decoder on CUDA devices (None on CPU, with ``decoder="cpu"``, or when no GPU
        decode library works here: tiles are then decoded on the CPU and uploaded)."""
        if self.device.type != "cuda" or self.decoder_name == "cpu":
            return None
        if self._gpu_decoder is None:
            from gpfm_engine.decode import create_gpu_decoder

            try:
                self._gpu_decoder = create_gpu_decoder(self.decoder_name, self.device)
            except GpfmError as exc:
                if self.decoder_name != "auto":
                    raise
                log.info("GPU tile decode unavailable (%s); decoding on the CPU", exc)
                self._gpu_decoder = False
        return self._gpu_decoder or None

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights file the backend loaded (part of every recipe)."""
        return str(self.backend.weights_sha256 or "")

    @property
    def feature_dim(self) -> int:
        return int(self.cfg.feature_dim)

    def recipe(self, mpp: float | None = None) -> dict[str, Any]:
        """Everything that determines a slide's features; its hash decides resume (see store.py)."""
        return {
            "model": self.model_name,
            "weights_sha256": self.weights_sha256,
            "feature_dim": self.feature_dim,
            "precision": self.precision,
            "preprocessing": {"input_size": self.cfg.input_size, "interpolation": self.cfg.interpolation,
                              "mean": list(self.cfg.mean), "std": list(self.cfg.std)},
            "geometry": _as_dict(self.grid_params),
            "tissue": _as_dict(self.tissue_params),
            "mpp_override": mpp if mpp is not None else self.mpp,
        }

    # ------------------------------------------------------------------ slide side
    def open(self, path_or_slide: Any, mpp: float | None = None):
        """An open Slide (a Slide passed in is returned as is)."""
        if isinstance(path_or_slide, (str, os.PathLike)):
            override = mpp if mpp is not None else self.mpp
            return open_slide(path_or_slide, mpp=override)
        return path_or_slide

    def plan(self, slide: Any) -> SlidePlan:
        """Tissue mask and patch grid of an open slide (no pixels beyond the thumbnail are read)."""
        t0 = time.perf_counter()
        mask = segment_tissue(slide, self.tissue_params, skip_corrupt_tiles=self.on_tile_error == "skip")
        grid = make_grid(slide, mask, self.grid_params)
        level = int(grid.read_level)
        layout = slide.tile_layout(level)
        return SlidePlan(slide, grid, mask, layout, float(slide.level_downsamples[level]),
                         seconds=time.perf_counter() - t0)

    def gather_for(self, plan: SlidePlan):
        """The gather kernel set up for this slide's read level, patch size and the model's input."""
        level = int(plan.grid.read_level)
        return PatchGather(plan.layout, level, float(plan.grid.patch_size_read), self.cfg.input_size,
                           self.cfg.mean, self.cfg.std, self.backend.input_dtype,
                           level_size=tuple(plan.slide.level_dimensions[level]))

    def meta(self, plan: SlidePlan, name: str | None = None) -> dict[str, Any]:
        """The attributes of a slide's output: TRIDENT's on ``coords`` (same names, same meaning),
        then ours (exact physical geometry and the software that produced the features)."""
        g, s = plan.grid, plan.slide
        mpp0 = float(g.mpp_level0)
        mpp_target = float(g.mpp_target)
        fov = float(g.fov_um)
        patch_size = int(round(fov / mpp_target))  # px at the target magnification
        overlap_frac = float(getattr(g, "overlap", 0.0) or 0.0)
        width, height = (int(v) for v in s.dimensions)
        return {
            "patch_size": patch_size,
            "patch_size_level0": int(g.patch_size_level0_int),
            "level0_magnification": round(10.0 / mpp0, 4),
            "target_magnification": round(10.0 / mpp_target, 4),
            "overlap": int(round(overlap_frac * patch_size)),
            "level0_width": width,
            "level0_height": height,
            "name": name if name is not None else Path(str(getattr(s, "path", "slide"))).stem,
            "mpp_level0": mpp0,
            "mpp_target": mpp_target,
            "mpp_effective": float(g.mpp_effective),
            "read_level": int(g.read_level),
            "level_downsample": plan.downsample,
            "patch_size_read": float(g.patch_size_read),
            "fov_um": fov,
            "encoder": self.model_name,
            "engine_version": __version__,
            "source_path": str(getattr(s, "path", "")),
            "reader": str(getattr(s, "backend", "")),
            # corrupt stored tiles painted as background in the thumbnail (tiles_skipped counts the
            # ones met while reading patches; a tile can be met by both)
            "mask_tiles_skipped": int(getattr(plan.mask, "tiles_skipped", 0)),
        }

    def model_meta(self) -> dict[str, Any]:
        """Attributes that need the backend (weights hash, precision, backend name)."""
        return {"weights_sha256": self.weights_sha256, "precision": self.precision,
                "backend": str(getattr(self.backend, "name", self.backend_name))}

    # ------------------------------------------------------------------ public API
    def iter_batches(self, path_or_slide: Any, mpp: float | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Stream (coords int64 [n, 2], features [n, D] on the device) batch by batch."""
        slide = self.open(path_or_slide, mpp)
        try:
            plan = self.plan(slide)
            for batch in stream_slide(self, plan):
                yield batch.coords, batch.features
        finally:
            if slide is not path_or_slide:
                slide.close()

    def embed_slide(self, path_or_slide: Any, mpp: float | None = None) -> SlideEmbedding:
        """All kept patches of a slide: features on the engine's device, coords, and the meta."""
        slide = self.open(path_or_slide, mpp)
        try:
            plan = self.plan(slide)
            coords, feats, skipped = [], [], 0
            for batch in stream_slide(self, plan):
                coords.append(batch.coords)
                feats.append(batch.features)
                skipped += batch.tiles_skipped
            features = torch.cat(feats) if feats else torch.empty((0, self.feature_dim), device=self.device)
            meta = dict(self.meta(plan), **self.model_meta(), tiles_skipped=skipped)
            return SlideEmbedding(features, np.concatenate(coords) if coords else np.zeros((0, 2), np.int64), meta)
        finally:
            if slide is not path_or_slide:
                slide.close()

    def embed_tiles(self, images: Any) -> torch.Tensor:
        """Features of tiles given as uint8 RGB: an [N, H, W, 3] / [H, W, 3] array or tensor (CPU or
        CUDA), a PIL image, or a sequence of those. Each tile is resampled to the model input with
        the same antialiased bicubic as slide patches, then normalized with the model's mean/std."""
        return embed_images(self, _as_uint8_batches(images))


def _as_dict(params: Any) -> dict[str, Any]:
    if is_dataclass(params):
        return asdict(params)
    return dict(vars(params))


def _as_uint8_batches(images: Any) -> list[tuple[np.ndarray, torch.Tensor]]:
    """The accepted image inputs as (positions in the input, uint8 [n, H, W, 3] tensor), one
    entry per distinct tile size and device, so that each entry can be resampled in one pass."""
    from PIL import Image

    if isinstance(images, (np.ndarray, torch.Tensor)):
        t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if t.dtype != torch.uint8:
            raise GpfmError(f"embed_tiles: expected uint8 RGB tiles, got {t.dtype}")
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] != 3:
            raise GpfmError(f"embed_tiles: expected [N, H, W, 3] RGB tiles, got shape {tuple(t.shape)}")
        return [(np.arange(len(t)), t)]
    if isinstance(images, Image.Image):
        images = [images]
    if not isinstance(images, Sequence):
        raise GpfmError(f"embed_tiles: unsupported input type {type(images).__name__}")
    groups: dict[tuple[int, int, str], list[tuple[int, torch.Tensor]]] = {}
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            im = np.array(_composite_rgb(im))
        ((_, t),) = _as_uint8_batches(im)
        if len(t) != 1:
            raise GpfmError("embed_tiles: a sequence must hold single [H, W, 3] images")
        groups.setdefault((t.shape[1], t.shape[2], str(t.device)), []).append((i, t))
    return [(np.array([i for i, _ in g]), torch.cat([t for _, t in g])) for g in groups.values()]


def _composite_rgb(im):
    """A PIL image as RGB, transparent areas composited on white (as slide backgrounds are)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


__all__ = ["Engine", "SlideEmbedding", "SlidePlan", "default_workers"]
