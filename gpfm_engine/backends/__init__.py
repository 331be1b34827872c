"""Inference backends behind one interface (``Backend.run(batch) -> features``) and their factory.

``create_backend("auto", ...)`` picks TensorRT on CUDA when it imports and the precision is a
reduced one, otherwise PyTorch; ONNX Runtime is chosen explicitly (``"onnx"``). Heavy optional
packages are imported only by the backend that needs them.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from gpfm_engine.backends.base import Backend, precision_dtype
from gpfm_engine.errors import GpfmError

BACKENDS = ("torch", "onnx", "tensorrt")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_backend(device: torch.device, precision: str) -> str:
    """The ``auto`` rule: TensorRT for bf16/fp16/fp8 on CUDA when importable, else torch."""
    if device.type == "cuda" and precision != "fp32" and importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    return "torch"


def torch_options(device: torch.device, backend: str, batch_size: int, compile: bool | None = None,
                  cuda_graphs: bool | None = None) -> dict[str, Any]:
    """The torch backend's ``compile`` / ``cuda_graphs`` / ``buckets`` options for a run.

    ``None`` means auto: on for the torch backend on CUDA, where launch overhead is worth removing
    and the pipeline's fixed batch size makes a few buckets cover every batch (compile only when
    Triton, which inductor's CUDA kernels need, imports); off on CPU, where compiling costs more
    than a short run gains. ``backend`` is the resolved backend name (other
    backends take no such options). An explicit request that cannot be honoured fails here, before
    any weights are loaded.
    """
    if backend != "torch":
        if compile or cuda_graphs:
            raise GpfmError(f"torch.compile and CUDA graphs apply to the torch backend, not {backend}")
        return {}
    on_cuda = device.type == "cuda"
    if cuda_graphs and not on_cuda:
        raise GpfmError(f"CUDA graphs need a CUDA device, not {device}")
    compile = (on_cuda and importlib.util.find_spec("triton") is not None) if compile is None else bool(compile)
    cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
    options: dict[str, Any] = {"compile": compile, "cuda_graphs": cuda_graphs}
    if compile or cuda_graphs:
        from gpfm_engine.backends.torch_backend import buckets_for

        options["buckets"] = buckets_for(batch_size)
    return options


def create_backend(name: str = "auto", model_name: str = "gpfm", weights: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu", precision: str = "fp32", *,
                   allow_download: bool | None = None, **options: Any) -> Backend:
    """Load ``model_name`` with its weights and wrap it in the named backend.

    ``options`` go to the backend: torch ``compile``/``cuda_graphs``/``buckets``/``compile_mode``;
    onnx ``threads``; tensorrt ``profile``/``opt_level``/``cache``.
    """
    from gpfm_engine.models import get_model_cfg, load_model

    device = resolve_device(device)
    if name == "auto":
        name = choose_backend(device, precision)
    if name not in BACKENDS:
        raise GpfmError(f"unknown backend '{name}'; choose auto or one of {', '.join(BACKENDS)}")
    get_model_cfg(model_name)  # unknown names fail before anything heavy happens
    if name == "tensorrt":
        from gpfm_engine.backends.tensorrt_backend import TensorRTBackend, require_tensorrt

        require_tensorrt()  # fail before loading a large checkpoint
        return TensorRTBackend.from_model(load_model(model_name, weights, allow_download=allow_download),
                                          device, precision, **options)
    model = load_model(model_name, weights, allow_download=allow_download)
    if name == "onnx":
        from gpfm_engine.backends.onnx_backend import OnnxBackend

        return OnnxBackend.from_model(model, device, precision, **options)
    from gpfm_engine.backends.torch_backend import TorchBackend

    return TorchBackend(model, device, precision, **options)


__all__ = ["BACKENDS", "Backend", "choose_backend", "create_backend", "precision_dtype", "resolve_device",
           "torch_options"]
