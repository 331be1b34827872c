"""Preprocess: the fused gather kernel vs assembling each patch and transforming it with PIL + torch.

Both sides start from the same decoded stored tiles in memory (the read + decode stage is timed by
``bench_read``) and produce the same normalized [N, 3, 224, 224] float32 batch:

- engine: ``PatchGather.plan`` + ``PatchGather.run`` (crop, PIL-exact antialiased bicubic,
  normalize, NCHW, one pass over the tiles) into a preallocated buffer, on ``ctx.threads`` threads;
- baseline: what ``read_region`` + the users' transform do, per patch on a ``ctx.threads`` thread
  pool (PIL releases the GIL while resizing): paint the patch from the tiles into a white canvas,
  ``Image.fromarray``, ``Resize((224, 224), BICUBIC)`` + ``ToTensor`` + ``Normalize`` written in PIL and
  plain torch (``benchmarks.baselines.PilTransform``), then ``torch.stack``. torch's intra-op
  threads are set to 1 for the stage, so each side runs ``ctx.threads`` threads (the pool's
  workers each running torch would otherwise add torch's own threads on top).

Before timing, the two batches are compared (max absolute difference, in the note) so the ratio is
known to compare the same work. Pixels are random: both sides' cost is independent of content.
Patch sizes are the GPFM ones at 20x, 40x and 80x (256, 512, 1024 px -> 224), at tile seams.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from benchmarks.baselines import PilTransform
from benchmarks.harness import BenchContext, Result, compare

log = logging.getLogger(__name__)

NAME = "preprocess"
GOAL = 5.0
OUT = 224
TILE = 240  # Aperio's usual stored tile
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the GPFM cfg's (ImageNet) values
SIZES = (512, 256, 1024)  # 40x (the GPFM default), 20x, 80x


class TileLevel:
    """A synthetic read level held as decoded stored tiles, as the tile cache would hold them."""

    def __init__(self, columns: int, rows: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.layout = SimpleNamespace(tile_width=TILE, tile_height=TILE, columns=columns, rows=rows)
        self.tiles = [rng.integers(0, 256, (TILE, TILE, 3), dtype=np.uint8) for _ in range(columns * rows)]

    def coords(self, n: int, size: int, seed: int) -> np.ndarray:
        """n level-0 (= read level) top-lefts, most of them across tile seams."""
        rng = np.random.default_rng(seed)
        w, h = self.layout.columns * TILE, self.layout.rows * TILE
        return np.stack([rng.integers(0, w - size, n), rng.integers(0, h - size, n)], axis=1)

    def read_region(self, x: int, y: int, size: int) -> Image.Image:
        """The patch painted from its tiles onto white, as OpenSlide's read_region composes it."""
        canvas = np.full((size, size, 3), 255, np.uint8)
        for ty in range(y // TILE, (y + size - 1) // TILE + 1):
            for tx in range(x // TILE, (x + size - 1) // TILE + 1):
                tile = self.tiles[ty * self.layout.columns + tx]
                x0, y0 = max(x, tx * TILE), max(y, ty * TILE)
                x1, y1 = min(x + size, (tx + 1) * TILE), min(y + size, (ty + 1) * TILE)
                ox, oy = tx * TILE, ty * TILE
                canvas[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        return Image.fromarray(canvas)


def compare_size(ctx: BenchContext, level: TileLevel, size: int, n: int) -> Result:
    from gpfm_engine import _core
    from gpfm_engine.gather import PatchGather

    coords = level.coords(n, size, seed=size)
    gather = PatchGather(level.layout, 0, size, OUT, MEAN, STD, torch.float32)
    out = gather.empty_batch(n)
    transform = PilTransform(OUT, MEAN, STD, "bicubic")
    pool = ThreadPoolExecutor(ctx.threads)

    def engine() -> torch.Tensor:
        plan = gather.plan(coords, 1.0)
        return gather.run([level.tiles[i] for i in plan.tile_indices], plan, out)

    def baseline() -> torch.Tensor:
        return torch.stack(list(pool.map(lambda xy: transform(level.read_region(int(xy[0]), int(xy[1]), size)),
                                         coords)))

    previous = _core.num_threads(), torch.get_num_threads()
    _core.set_num_threads(ctx.threads)
    torch.set_num_threads(1)
    try:
        max_diff = float((engine() - baseline()).abs().max())
        log.info("%s %d px: max |engine - baseline| = %.2e", NAME, size, max_diff)
        note = (f"{n} patches {size} px -> {OUT}, {TILE} px tiles in memory, {ctx.threads} threads both sides; "
                f"max |engine - baseline| {max_diff:.1e}")
        return compare(f"{NAME} {size}->{OUT}", engine, baseline, ctx.repeats, ctx.warmup, work=n, units="patches",
                       goal=GOAL, note=note, baseline_label="read_region + PIL + torch")
    finally:
        _core.set_num_threads(previous[0])
        torch.set_num_threads(previous[1])
        pool.shutdown()


def run(ctx: BenchContext) -> list[Result]:
    n = 32 if ctx.quick else 128
    level = TileLevel(columns=20, rows=16)
    return [compare_size(ctx, level, size, n) for size in SIZES]
