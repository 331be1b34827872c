"""Benchmark inputs: synthesized slides generated once and cached, plus the real slides when present.

Why cached: the large slide takes minutes to synthesize on 2 cores; every stage benchmark (and
every engineer running one) reuses the same file. The cache lives in ``$GPFM_BENCH_CACHE`` or
``~/.cache/gpfm-engine/bench``; files are written to a temporary name and renamed, under a lock,
so concurrent benchmark runs wait for one generator instead of racing.

Sizes: the large slide is the issue's 40k x 30k px (1.2 Gpx, 21k level-0 tiles). Synthesizing it
takes ~270 s of single-core CPU once (12 ms to render + 0.2 ms to encode one 240 px tile), 5-15
minutes wall on the shared 2-core machine; later runs reuse the cached file.
``GPFM_BENCH_SLIDE_SIZE=32000x24000`` (or ``--slide-size``) picks another size. The medium slide
takes ~25 s, the 200 small ones 2.5-13 min (depending on the load).
"""
from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gpfm_engine import synth

log = logging.getLogger(__name__)

DEFAULT_LARGE = (40000, 30000)
QUICK_LARGE = (8000, 6000)          # --quick: a smoke run of the whole suite in a few minutes
MEDIUM = (12000, 9000)              # end-to-end: every tissue patch goes through the model
SMALL = (1024, 768)                 # memory: many slides, 0-12 (about 6) 256 px patches (128 um at 0.5 um/px)
SMALL_MPP = 0.5
SMALL_COVERAGE = 0.95               # a 0.5 x 0.4 mm slide is smaller than a tissue island: raise the coverage
REAL_MAX_MPP = 2.0                  # real slides coarser than this have no 128 um patches worth timing

REPO = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """``$GPFM_BENCH_CACHE`` or ``~/.cache/gpfm-engine/bench`` (created)."""
    d = Path(os.environ.get("GPFM_BENCH_CACHE") or Path.home() / ".cache" / "gpfm-engine" / "bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


def parse_size(text: str) -> tuple[int, int]:
    """``"40000x30000"`` -> ``(40000, 30000)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"slide size must look like 40000x30000, not {text!r}") from None
    return w, h


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_slide(name: str, **write_slide_kwargs) -> Path:
    """``synth.write_slide(**kwargs)`` into the cache as ``name``, unless it is already there."""
    path = cache_dir() / name
    if path.exists():
        return path
    with _locked(path):
        if not path.exists():  # another process may have finished it while we waited
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
            log.info("synthesizing %s %s (cached for later runs)", path, write_slide_kwargs.get("size"))
            try:
                synth.write_slide(tmp, **write_slide_kwargs)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return path


def _svs_name(prefix: str, size: tuple[int, int], seed: int) -> str:
    return f"{prefix}-{size[0]}x{size[1]}-jpeg-q90-seed{seed}.svs"


def large_slide(quick: bool = False) -> Path:
    """The large JPEG pyramid (Aperio-like SVS, 0.25 um/px, 240 px tiles, 4x levels)."""
    env = os.environ.get("GPFM_BENCH_SLIDE_SIZE")
    size = QUICK_LARGE if quick else (parse_size(env) if env else DEFAULT_LARGE)
    return cached_slide(_svs_name("large", size, 0), size=size, seed=0)


def medium_slide() -> Path:
    """A slide small enough that embedding every tissue patch fits in an interleaved benchmark."""
    return cached_slide(_svs_name("medium", MEDIUM, 1), size=MEDIUM, seed=1)


def small_slides(n: int) -> list[Path]:
    """``n`` distinct small slides (different seeds) in one folder, for the memory benchmark."""
    folder = cache_dir() / f"small-{SMALL[0]}x{SMALL[1]}-mpp{SMALL_MPP}-cov{SMALL_COVERAGE}"
    folder.mkdir(exist_ok=True)
    return [cached_slide(f"{folder.name}/s{i:03d}.svs", size=SMALL, mpp=SMALL_MPP, objective=20.0, seed=100 + i,
                         coverage=SMALL_COVERAGE) for i in range(n)]


def shared_data_dir() -> Path | None:
    """``$GPFM_TEST_DATA`` or ``../shared/data`` beside the repository, when it exists."""
    env = os.environ.get("GPFM_TEST_DATA")
    for c in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if c.is_dir():
            return c
    return None


def real_slides() -> list[Path]:
    """Real slides under ``<shared data>/wsi`` that OpenSlide opens with a usable mpp, sorted.

    Empty when the data is absent. Stages decide which of them their engine side can read.
    """
    import openslide

    root = shared_data_dir()
    if root is None:
        return []
    found = []
    for p in sorted((root / "wsi").rglob("*")):
        if not p.is_file() or "negative" in p.parts or p.suffix.lower() in (".ets", ".md"):
            continue
        try:
            with openslide.OpenSlide(p) as s:
                mpp = float(s.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
                big_enough = min(s.dimensions) >= 1024
        except (openslide.OpenSlideError, ValueError, OSError):
            continue
        if mpp <= REAL_MAX_MPP and big_enough:
            found.append(p)
    return found
