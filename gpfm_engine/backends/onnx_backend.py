"""ONNX Runtime backend (CPU): runs the graph ``gpfm_engine.export`` writes.

Its jobs are to prove the exported graph — the same file TensorRT builds engines from — computes
what PyTorch computes, and to offer ONNX Runtime's CPU kernels as an alternative to PyTorch's.
Exports are cached by model, weights hash, precision, input size, opset and engine version.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gpfm_engine import __version__
from gpfm_engine.backends.base import Backend
from gpfm_engine.backends.cache import cache_dir
from gpfm_engine.errors import GpfmError
from gpfm_engine.models.registry import ModelCfg

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def model_fingerprint(model: nn.Module) -> str:
    """The weights' sha256 when loaded from a file; otherwise a hash of the parameter bytes."""
    sha = getattr(model, "weights_sha256", None)
    if sha:
        return sha
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_onnx(model: nn.Module, precision: str = "fp32", opset: int | None = None) -> Path:
    """The exported graph of ``model`` from the cache, exported first when absent."""
    from gpfm_engine.export import DEFAULT_OPSET, export_onnx

    cfg: ModelCfg = model.cfg
    opset = opset or DEFAULT_OPSET
    name = f"{cfg.name}-{model_fingerprint(model)[:16]}-{precision}-{cfg.input_size}px-op{opset}-v{__version__}.onnx"
    path = cache_dir("onnx") / name
    if not path.is_file():
        export_onnx(model, path, precision=precision, input_size=cfg.input_size, opset=opset)
    return path


class OnnxBackend(Backend):
    """``onnxruntime.InferenceSession`` on the CPU execution provider; torch tensors in and out."""

    name = "onnx"

    def __init__(self, onnx_path: str | os.PathLike, cfg: ModelCfg, device: str | torch.device = "cpu",
                 precision: str = "fp32", *, weights_sha256: str | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        device = torch.device(device)
        if device.type != "cpu":
            raise GpfmError("the onnx backend runs on CPU; use the torch or tensorrt backend on CUDA")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - invalid or unreadable graph: one line naming the file
            raise GpfmError(f"{onnx_path}: ONNX Runtime cannot load the graph: {str(exc).splitlines()[0]}") from exc
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.type not in _ORT_TYPES:
            raise GpfmError(f"{onnx_path}: input type {inp.type} cannot run on ONNX Runtime's CPU provider")
        self.onnx_path = Path(onnx_path)
        self._input, self._output = inp.name, out.name
        super().__init__(cfg, device, precision, _ORT_TYPES[inp.type], weights_sha256)

    @classmethod
    def from_model(cls, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                   **options) -> "OnnxBackend":
        """Export (or reuse the cached export of) ``model`` and open it."""
        if precision != "fp32":
            raise GpfmError("the onnx backend runs fp32 on CPU; reduced precisions are for TensorRT")
        return cls(cached_onnx(model, precision), model.cfg, device, precision,
                   weights_sha256=getattr(model, "weights_sha256", None), **options)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(batch.numpy())
        return torch.from_numpy(self.session.run([self._output], {self._input: x})[0]).float()

    def describe(self) -> dict:
        return super().describe() | {"onnx": str(self.onnx_path)}
