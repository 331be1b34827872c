"""Where compiled artefacts (exported ONNX graphs, TensorRT plans, timing caches) are kept.

They are expensive to rebuild (minutes for a ViT-L engine), so they live in a per-user cache
(``$GPFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpfm-engine``, else ``~/.cache/gpfm-engine``) under
names that encode everything they depend on. Writes are atomic: a crash never leaves a
half-written file that a later run would trust.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "GPFM_CACHE_DIR"


def cache_dir(kind: str) -> Path:
    """The cache folder for one kind of artefact (``onnx``, ``tensorrt``), created on demand."""
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gpfm-engine"
    path = base / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
