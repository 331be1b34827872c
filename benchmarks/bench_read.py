"""Stage benchmark: read + decode every level-0 stored tile, engine vs OpenSlide ``read_region``.

Both sides get the same tile-aligned windows, the same thread count and no tile cache (each call
does the full read and decode work), and both end with one uint8 numpy array per tile:
- engine: ``Slide.read_tiles(0, all tiles, executor=pool)`` — os.pread of raw tiles, JPEG tables
  spliced, imagecodecs/libjpeg-turbo decode spread over the pool;
- baseline: ``OpenSlide.read_region`` of each tile's window, mapped over a pool of the same size,
  converted with ``np.asarray`` (what OpenSlide-based pipelines do).
A third function in the same rounds, the "ceiling", is the bare codec: ``imagecodecs.jpeg8_decode``
of the already read and spliced streams, chunked over the same pool (no reads, no checks, no
padding). Its ratio to OpenSlide is the most any reader built on this libjpeg-turbo can reach on
the slide; the engine row's distance to it is our own overhead.
Every side works through the tiles in requests of ``BATCH_TILES`` (results dropped after each), as
a pipeline would. Inputs: the real CMU-1-Small-Region.svs (when ../shared/data is present) and the
cached large synthesized slide (40000 x 30000, 240-px JPEG tiles; 8000 x 6000 with ``--quick``). Run alone with
``python -m benchmarks.bench_read`` or as the ``read`` stage of ``python -m benchmarks``.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.harness import BenchContext, Comparison, Skipped, interleave

GOAL = 5.0
MIN_TILES_PER_CALL = 1000  # small slides are read several times per call so a call lasts long enough
BATCH_TILES = 512  # tiles decoded per request on every side: the large slide's 21k decoded tiles would need 3.6 GB


def inputs(ctx: BenchContext) -> list[tuple[str, Path]]:
    """(label, path) of the slides to read."""
    from benchmarks import data

    found = []
    shared = data.shared_data_dir()
    if shared is not None and (shared / "wsi/aperio/CMU-1-Small-Region.svs").is_file():
        found.append(("CMU-1-Small-Region.svs", shared / "wsi/aperio/CMU-1-Small-Region.svs"))
    synthesized = data.large_slide(quick=ctx.quick)  # the large synthesized slide (8k x 6k with --quick)
    found.append((f"synthesized {synthesized.stem}", synthesized))
    return found


def compare_slide(label: str, path: Path, ctx: BenchContext, pool: ThreadPoolExecutor) -> list[Comparison]:
    """Engine and bare-codec ceiling, each against OpenSlide, over all level-0 tiles of ``path``
    (the three timed in the same interleaved rounds)."""
    import imagecodecs
    import openslide

    from gpfm_engine.slide import TileCache, open_slide
    from gpfm_engine.slide.base import TILE_CHUNKS

    ours = open_slide(path, backend="tiff", tile_cache=TileCache(0))
    theirs = openslide.OpenSlide(str(path))
    theirs.set_cache(openslide.OpenSlideCache(0))
    layout = ours.tile_layout(0)
    indices = list(range(layout.count))
    w0, h0 = ours.dimensions
    windows = [((x, y), (min(layout.tile_width, w0 - x), min(layout.tile_height, h0 - y)))
               for x, y in (layout.origin(i) for i in indices)]
    passes = max(1, math.ceil(MIN_TILES_PER_CALL / len(indices)))
    batches = [indices[s : s + BATCH_TILES] for s in range(0, len(indices), BATCH_TILES)]

    def engine() -> None:
        for _ in range(passes):
            for batch in batches:
                ours.read_tiles(0, batch, executor=pool)

    def baseline() -> None:
        for _ in range(passes):
            for batch in batches:
                list(pool.map(lambda i: np.asarray(theirs.read_region(windows[i][0], 0, windows[i][1])), batch))

    streams = ours.read_raw_tiles(0, indices) if layout.compression == "jpeg" else []
    step = max(1, -(-min(len(streams), BATCH_TILES) // TILE_CHUNKS))
    stream_batches = [streams[s : s + BATCH_TILES] for s in range(0, len(streams), BATCH_TILES)]
    chunked = [[batch[c : c + step] for c in range(0, len(batch), step)] for batch in stream_batches]

    def bare_codec() -> None:
        for _ in range(passes):
            for chunks in chunked:
                list(pool.map(lambda chunk: [imagecodecs.jpeg8_decode(stream) for stream in chunk], chunks))

    fns = {"gpfm-engine tiff": engine, "OpenSlide read_region": baseline}
    if streams:
        fns["bare libjpeg-turbo decode"] = bare_codec
    try:
        times = interleave(fns, ctx.repeats, ctx.warmup, name=label)
    finally:
        ours.close()
        theirs.close()
    note = (f"{len(indices)} tiles {layout.tile_width}x{layout.tile_height} {layout.compression} x{passes}, "
            f"{ctx.threads} threads, no tile cache either side")
    work = len(indices) * passes
    rows = [Comparison(f"read+decode level 0, {label}", times["gpfm-engine tiff"], times["OpenSlide read_region"],
                       work=work, units="tiles", goal=GOAL, note=note, engine_label="gpfm-engine tiff",
                       baseline_label="OpenSlide read_region")]
    if streams:
        rows.append(Comparison(f"read+decode ceiling, {label}: bare codec vs OpenSlide",
                               times["bare libjpeg-turbo decode"], times["OpenSlide read_region"], work=work,
                               units="tiles", note=note + "; imagecodecs.jpeg8_decode of pre-read streams: the most "
                               "a reader on this libjpeg-turbo can reach", engine_label="bare libjpeg-turbo decode",
                               baseline_label="OpenSlide read_region"))
    return rows


def run(ctx: BenchContext) -> list[Comparison | Skipped]:
    """The read+decode stage: one comparison per input slide."""
    try:
        import openslide  # noqa: F401 - the baseline
    except ImportError as exc:
        return [Skipped("read+decode", f"OpenSlide baseline not importable: {exc}")]
    with ThreadPoolExecutor(ctx.threads) as pool:
        return [row for label, path in inputs(ctx) for row in compare_slide(label, path, ctx, pool)]


def main() -> None:
    import argparse
    import logging
    import os

    from benchmarks.harness import render_markdown

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_read", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    ctx = BenchContext(repeats=args.repeats, warmup=args.warmup, threads=args.threads, quick=args.quick)
    results = run(ctx)
    print(render_markdown(results))
    for r in results:
        if isinstance(r, Comparison):
            print(f"{r.name}: median {r.ratio_median:.2f}x (min {r.ratio_min:.2f}x, max {r.ratio_max:.2f}x); "
                  f"engine {r.rate('engine'):,.0f} tiles/s, OpenSlide {r.rate('baseline'):,.0f} tiles/s")


if __name__ == "__main__":
    main()
