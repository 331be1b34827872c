"""The one interface every inference backend offers: normalized image batch in, features out.

The pipeline writes each batch straight into a tensor of ``backend.input_dtype`` on
``backend.device`` (the gather kernel's output buffer) and gets ``[N, feature_dim]`` float32
features back as a torch tensor on the same device, so no backend choice leaks into the pipeline.
``run`` is a template method: the base class checks the batch once, the backend only computes.
"""
from __future__ import annotations

import abc
from typing import Any

import torch

from gpfm_engine.errors import GpfmError
from gpfm_engine.models.registry import ModelCfg

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; one error line for unknown names."""
    try:
        return PRECISION_DTYPES[precision]
    except KeyError:
        raise GpfmError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISION_DTYPES)}") from None


class Backend(abc.ABC):
    """Base of the torch, ONNX Runtime and TensorRT backends.

    Attributes: ``name`` ("torch" | "onnx" | "tensorrt"), ``cfg`` (the model's ``ModelCfg``, which
    carries the preprocessing), ``device``, ``precision``, ``input_dtype``, ``feature_dim``,
    ``weights_sha256`` (for run recipes).
    """

    name: str = "abstract"

    def __init__(self, cfg: ModelCfg, device: torch.device, precision: str, input_dtype: torch.dtype,
                 weights_sha256: str | None) -> None:
        self.cfg = cfg
        self.device = device
        self.precision = precision
        self.input_dtype = input_dtype
        self.feature_dim = cfg.feature_dim
        self.weights_sha256 = weights_sha256

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image: (3, input_size, input_size)."""
        return (3, self.cfg.input_size, self.cfg.input_size)

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Features [N, feature_dim] float32 on ``self.device`` for a normalized [N, 3, S, S] batch.

        A batch of another dtype or device is converted (a copy the pipeline avoids by writing
        ``input_dtype`` on ``device`` directly).
        """
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise GpfmError(f"{self.name} backend for '{self.cfg.name}' expects [N, {', '.join(map(str, self.input_shape))}]"
                            f" batches, got {list(batch.shape)}")
        if batch.shape[0] == 0:
            return torch.empty((0, self.feature_dim), dtype=torch.float32, device=self.device)
        batch = batch.to(device=self.device, dtype=self.input_dtype, non_blocking=True)
        return self._run(batch)

    @abc.abstractmethod
    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        """Compute features of a checked, non-empty batch already of ``input_dtype`` on ``device``."""

    def describe(self) -> dict[str, Any]:
        """What produced the features, for the run recipe."""
        return {"backend": self.name, "model": self.cfg.name, "device": str(self.device), "precision": self.precision,
                "input_dtype": str(self.input_dtype).removeprefix("torch."), "weights_sha256": self.weights_sha256}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.cfg.name!r}, device={str(self.device)!r}, precision={self.precision!r})"
