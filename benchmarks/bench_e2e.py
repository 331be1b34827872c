"""End-to-end: ``Engine.embed_slide`` vs the CLAM- and TRIDENT-style baselines, one interleaved run.

Engine side: open, tissue mask, grid, read + decode, gather, model, for every kept patch of the
slide. Baseline side: the same model (same weights, fp32, eval) on the engine's own coordinates,
read at the engine's read level and size with OpenSlide, PIL-resized and normalized, as users
write it (``benchmarks/baselines.py``). The baselines are handed the coordinates, so their tissue
masking is not timed: this favours the baselines, which is the safe direction for a speed claim.

The engine runs twice per round: with the torch backend (the same eager model as the baselines, so
the ratio isolates the data path) and with the ONNX Runtime backend (same weights, fp32). Before
timing, the baseline features are checked against each engine's (cosine per patch) so the ratio
is known to compare the same work; the minimum cosine is printed in the note. The TRIDENT-style
calls also time their own model calls ("ceiling" row = call time / model time): when the model
dominates (gpfm-tiny on 2 CPU cores), no data path with the same model can beat it by more.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from benchmarks import baselines, data, model_choice
from benchmarks.harness import BenchContext, Comparison, Result, Skipped, interleave

log = logging.getLogger(__name__)

NAME = "end-to-end"
GOAL = 3.0
BATCH_SIZE = 64
# The engine's default CPU backend (torch eager, like the baselines' model) and ONNX Runtime on the
# same weights at fp32: the first isolates the data path, the second is the engine's best CPU path.
# On the GPU suite only torch (the GPU backends are compared in benchmarks/gpu_check.py).
ENGINE_BACKENDS = {"cpu": ("torch", "onnx"), "gpu": ("torch",)}


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def read_geometry(meta: Mapping[str, Any]) -> tuple[int, int]:
    """(read level, patch side in px at that level) as the engine recorded them for the slide."""
    level = int(meta["read_level"])
    size = meta.get("patch_size_read")
    if size is None:  # derive it from level-0 size and the level's downsample
        size = float(meta["patch_size_level0"]) / float(meta["level_downsample"])
    return level, int(round(float(size)))


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-row cosine similarity of two [N, D] feature tensors."""
    if len(a) == 0:
        return 1.0
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).min())


def run(ctx: BenchContext) -> list[Result]:
    try:
        from gpfm_engine import Engine
    except ImportError:
        return [Skipped(NAME, "gpfm_engine.Engine is not there yet (pipeline issue)")]
    choice = model_choice.choose()
    slide = data.large_slide(quick=True) if ctx.quick else data.medium_slide()
    weights = None if choice.weights is None else str(choice.weights)
    engines = {backend: Engine(model=choice.name, weights=weights, device=ctx.device, backend=backend,
                               precision="fp32", batch_size=BATCH_SIZE, workers=ctx.threads)
               for backend in ENGINE_BACKENDS[ctx.suite]}
    first = {backend: e.embed_slide(slide) for backend, e in engines.items()}  # also builds/exports the backends
    ref = first["torch"]
    coords = _numpy(ref.coords).astype(np.int64)
    for backend, emb in first.items():
        if not np.array_equal(_numpy(emb.coords), coords):
            raise RuntimeError(f"engine backends {backend} and torch chose different coordinates")
    level, read_size = read_geometry(ref.meta)
    model = model_choice.load(choice, ctx.device)
    transform = baselines.pil_transform(model.cfg)

    def clam() -> torch.Tensor:
        return baselines.clam_style(slide, coords, level, read_size, model, transform, BATCH_SIZE, ctx.threads,
                                    ctx.device)

    trident_model_s: list[float] = []  # per call: seconds inside the model (the rest is its data path)

    def trident() -> torch.Tensor:
        timed = baselines.TimedModel(model)
        out = baselines.trident_style(slide, coords, level, read_size, timed, transform, BATCH_SIZE, ctx.threads,
                                      ctx.device)
        trident_model_s.append(timed.seconds)
        return out

    base_fns = {"CLAM-style": clam, "TRIDENT-style": trident}
    base_out = {label: fn() for label, fn in base_fns.items()}
    agreement = {backend: min(min_cosine(emb.features, out) for out in base_out.values())
                 for backend, emb in first.items()}
    log.info("%s: %d patches at level %d (%d px); min cosine engine vs baselines %s",
             NAME, len(coords), level, read_size, agreement)
    times = interleave({**{f"engine {b}": (lambda e=e: e.embed_slide(slide)) for b, e in engines.items()},
                        **base_fns}, ctx.repeats, ctx.warmup, name=NAME)
    common = (f"{slide.name}: {len(coords)} patches, level {level} {read_size} px -> {model.cfg.input_size}; "
              f"{choice.note}; fp32, batch {BATCH_SIZE}, {ctx.threads} threads/workers; baselines given the "
              f"engine's coords")
    results: list[Result] = []
    for backend in engines:
        for label in base_fns:
            results.append(Comparison(
                f"{NAME} (engine {backend}) vs {label}", times[f"engine {backend}"], times[label],
                work=len(coords), units="patches", goal=GOAL, engine_label=f"engine {backend}",
                baseline_label=label, note=f"{common}; min cosine vs baselines {agreement[backend]:.4f}"))
    results.append(Comparison(
        f"{NAME} ceiling: TRIDENT-style / its model time", trident_model_s[-ctx.repeats:], times["TRIDENT-style"],
        work=len(coords), units="patches", engine_label="its model calls", baseline_label="TRIDENT-style",
        note=f"{common}; time inside the eager model in the same calls: the most a data path alone can gain"))
    return results
