"""Shared fixtures: synthesized slides (always available) and third-party data (when present)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from gpfm_engine import synth

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$GPFM_TEST_DATA`` or ``../shared/data`` beside the repository, when it exists."""
    env = os.environ.get("GPFM_TEST_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real third-party test data; tests using it are skipped (with the reason) when absent."""
    d = shared_data_dir()
    if d is None:
        pytest.skip("third-party data not found: set GPFM_TEST_DATA or place it at ../shared/data")
    return d


SlideFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory: pytest.TempPathFactory) -> SlideFactory:
    """``slide_factory(**write_slide_kwargs) -> Path``: synthesize a pyramidal TIFF once per session.

    Same arguments give the same file, so tests can ask freely without paying twice.
    """
    root = tmp_path_factory.mktemp("slides")
    cache: dict[tuple, Path] = {}

    def make(name: str | None = None, **kwargs) -> Path:
        # the name is part of the key: a named copy (which a test may then corrupt) never replaces the
        # unnamed slide other tests get for the same arguments
        key = (name,) + tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k != "image")) + (id(kwargs.get("image")),)
        if key not in cache:
            fmt = kwargs.get("fmt", "svs")
            stem = name or f"slide{len(cache)}"
            path = root / (stem if "." in stem else f"{stem}.{'svs' if fmt == 'svs' else 'tif'}")
            cache[key] = synth.write_slide(path, **kwargs)
        return cache[key]

    return make
