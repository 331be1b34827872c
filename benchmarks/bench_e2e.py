"""End-to-end: ``Engine.embed_slide`` vs the CLAM- and TRIDENT-style baselines, one interleaved run.

Engine side: open, tissue mask, grid, read + decode, gather, model, for every kept patch of the
slide. Baseline side: the same model (same weights, fp32, eval) on the engine's own coordinates,
read at the engine's read level and size with OpenSlide, PIL-resized and normalized, as users
write it (``benchmarks/baselines.py``). The baselines are handed the coordinates, so their tissue
masking is not timed: this favours the baselines, which is the safe direction for a speed claim.

Before timing, the baseline features are checked against the engine's (cosine per patch) so the
ratio is known to compare the same work; the minimum cosine is printed in the note.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import torch

from benchmarks import baselines, data, model_choice
from benchmarks.harness import BenchContext, Result, Skipped, compare_all

log = logging.getLogger(__name__)

NAME = "end-to-end"
GOAL = 3.0
BATCH_SIZE = 64


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
    engine = Engine(model=choice.name, weights=None if choice.weights is None else str(choice.weights),
                    device=ctx.device, backend="torch", precision="fp32", batch_size=BATCH_SIZE,
                    workers=ctx.threads)
    first = engine.embed_slide(slide)
    coords = _numpy(first.coords).astype(np.int64)
    level, read_size = read_geometry(first.meta)
    model = model_choice.load(choice, ctx.device)
    transform = baselines.pil_transform(model.cfg)

    def clam() -> torch.Tensor:
        return baselines.clam_style(slide, coords, level, read_size, model, transform, BATCH_SIZE, ctx.threads)

    def trident() -> torch.Tensor:
        return baselines.trident_style(slide, coords, level, read_size, model, transform, BATCH_SIZE, ctx.threads)

    agreement = min(min_cosine(first.features, clam()), min_cosine(first.features, trident()))
    log.info("%s: %d patches at level %d (%d px); min cosine engine vs baselines %.5f",
             NAME, len(coords), level, read_size, agreement)
    note = (f"{slide.name}: {len(coords)} patches, level {level} {read_size} px -> {model.cfg.input_size}; "
            f"{choice.note}; fp32, batch {BATCH_SIZE}, {ctx.threads} threads/workers; baselines given the "
            f"engine's coords; min cosine vs baseline {agreement:.4f}")
    return compare_all(NAME, lambda: engine.embed_slide(slide), {"CLAM-style": clam, "TRIDENT-style": trident},
                       ctx.repeats, ctx.warmup, work=len(coords), units="patches", goal=GOAL, note=note)
