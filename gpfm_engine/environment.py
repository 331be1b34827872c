"""What this installation can do: library versions, the compiled extension, optional plug-ins.

Used by ``gpfm-engine info`` and recorded in run recipes, so a result can always be traced to the
software that produced it.
"""
from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import dataclass

from gpfm_engine import __version__
from gpfm_engine.errors import exception_summary


@dataclass(frozen=True)
class PluginStatus:
    """Whether an optional plug-in's package imports here, and why not when it does not."""

    name: str
    package: str
    available: bool
    detail: str


# (plug-in name, module to import, what it provides)
DECODER_PLUGINS = (
    ("cpu", "imagecodecs", "libjpeg-turbo / OpenJPEG / zlib / LZW on CPU threads"),
    ("dali", "nvidia.dali", "NVIDIA DALI GPU JPEG decode"),
    ("nvjpeg", "torchvision.io", "nvJPEG through torchvision.io.decode_jpeg(device='cuda')"),
    ("nvimgcodec", "nvidia.nvimgcodec", "NVIDIA nvImageCodec"),
)
BACKEND_PLUGINS = (
    ("torch", "torch", "PyTorch eager / torch.compile"),
    ("onnx", "onnxruntime", "ONNX Runtime"),
    ("tensorrt", "tensorrt", "TensorRT engines"),
)
SLIDE_PLUGINS = (
    ("tiff", "tifffile", "tifffile raw-tile fast path"),
    ("openslide", "openslide", "OpenSlide fallback"),
)


def probe(name: str, module: str) -> PluginStatus:
    """Import ``module`` and report its version, or the one-line reason it does not import."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return PluginStatus(name, module, False, exception_summary(exc))
    top = sys.modules.get(module.split(".")[0], mod)
    version = getattr(mod, "__version__", None) or getattr(top, "__version__", "")
    return PluginStatus(name, module, True, str(version))


def versions() -> dict[str, str]:
    """Versions of the interpreter and the core libraries the engine's results depend on."""
    out = {"gpfm-engine": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for module in ("torch", "numpy", "tifffile", "imagecodecs", "h5py", "onnxruntime", "openslide"):
        status = probe(module, module)
        out[module] = status.detail if status.available else "not installed"
    return out


def report() -> dict[str, object]:
    """Everything ``gpfm-engine info`` prints, as plain data (JSON-ready)."""
    from gpfm_engine.kernels import build_info

    def table(plugins: tuple[tuple[str, str, str], ...]) -> list[dict[str, object]]:
        rows = []
        for name, module, purpose in plugins:
            s = probe(name, module)
            rows.append({"name": name, "module": module, "purpose": purpose, "available": s.available, "detail": s.detail})
        return rows

    return {
        "versions": versions(),
        "build": build_info(),
        "decoders": table(DECODER_PLUGINS),
        "backends": table(BACKEND_PLUGINS),
        "slide_readers": table(SLIDE_PLUGINS),
    }
