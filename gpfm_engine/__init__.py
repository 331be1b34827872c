"""gpfm-engine: whole-slide images to GPFM foundation-model features, fast and verifiably right.

The public surface is deliberately small; everything else is reachable through its submodule.
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("gpfm-engine")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from gpfm_engine.models import load_model  # noqa: E402 - after __version__, which submodules import
from gpfm_engine.slide import open_slide  # noqa: E402
from gpfm_engine.engine import Engine, SlideEmbedding  # noqa: E402

__all__ = ["__version__", "Engine", "SlideEmbedding", "load_model", "open_slide"]
