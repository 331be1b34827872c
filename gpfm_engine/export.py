"""Export a registered encoder to ONNX: the input of ONNX Runtime and of TensorRT engine builds.

The graph is made for inference engines, not for flexibility: the batch axis is dynamic, the
image size is fixed (224 for GPFM), and the position embedding for that size is baked in as a
constant — exported bicubic resizes differ between exporters and runtimes (research/gpu.md §2.2).
The feature is pooled inside the graph, so only [N, D] float32 leaves it.

Precision is part of the graph, because TensorRT's strongly typed mode reads it from there:
``fp32``; ``bf16``/``fp16`` (weights and input in that type, LayerNorm — and in bf16 the patch
Conv — computed in float32, output float32); ``fp8`` (float32 graph with FP8 Q/DQ pairs on every linear layer, see ``backends/qdq.py``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from gpfm_engine import __version__
from gpfm_engine.backends.base import PRECISION_DTYPES
from gpfm_engine.errors import GpfmError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"
DEFAULT_OPSET = 18  # >= 17 gives native LayerNormalization (float32 accumulation in TensorRT)
# Graph dtype per precision; an fp8 graph is float32 with FP8 Q/DQ pairs on the linear layers.
PRECISIONS = PRECISION_DTYPES | {"fp8": torch.float32}
_SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf's hard limit is 2 GiB; larger graphs need external data


class _InFloat32(nn.Module):
    """Runs a module in float32 inside a low-precision graph, casting in and out.

    Used for LayerNorm (TensorRT warns that FP16 LayerNorm overflows, research/gpu.md §2.2) and,
    in bf16 graphs, for the patch-embedding Conv, whose ONNX type constraints exclude bfloat16
    (0.2% of the FLOPs).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


class _Features(nn.Module):
    """The exported function: images in the graph's dtype -> float32 features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).float()


def prepare_for_export(model: nn.Module, precision: str = "fp32", input_size: int | None = None) -> nn.Module:
    """A copy of ``model`` ready to trace: pos-embed baked for ``input_size``, cast to ``precision``."""
    if precision not in PRECISIONS:
        raise GpfmError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    m = copy.deepcopy(model).eval()
    size = input_size or getattr(getattr(model, "cfg", None), "input_size", None) or m.img_size
    if hasattr(m, "set_input_size"):
        m.set_input_size(size)
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:
        keep_fp32 = (nn.LayerNorm, nn.Conv2d) if dtype == torch.bfloat16 else (nn.LayerNorm,)
        m = m.to(dtype)
        for child in list(m.modules()):
            for attr, sub in list(child.named_children()):
                if isinstance(sub, keep_fp32):
                    setattr(child, attr, _InFloat32(sub))
    return _Features(m).eval()


def _metadata(model: nn.Module, precision: str, size: int) -> dict[str, str]:
    cfg = getattr(model, "cfg", None)
    meta = {"gpfm.engine_version": __version__, "gpfm.precision": precision, "gpfm.input_size": str(size),
            "gpfm.input_name": INPUT_NAME, "gpfm.output_name": OUTPUT_NAME}
    if cfg is not None:
        meta.update({"gpfm.model": cfg.name, "gpfm.feature_dim": str(cfg.feature_dim),
                     "gpfm.mean": ",".join(map(str, cfg.mean)), "gpfm.std": ",".join(map(str, cfg.std))})
    if getattr(model, "weights_sha256", None):
        meta["gpfm.weights_sha256"] = model.weights_sha256
    return meta


# The exporter's own loggers report every optimisation step at INFO; keep them quiet during export.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    try:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export internals, not ours
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _trace(wrapped: nn.Module, example: torch.Tensor, opset: int) -> Any:
    """The dynamo exporter's ONNXProgram with a dynamic batch axis (H, W static)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet_exporter():
        return torch.onnx.export(wrapped, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 opset_version=opset, dynamo=True, dynamic_shapes={"images": {0: batch}},
                                 verbose=False)


def _save(proto: Any, out: Path) -> None:
    """Write an onnx.ModelProto atomically (single file) or with external data when > ~1.8 GB."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    if proto.ByteSize() < _SINGLE_FILE_LIMIT:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        try:
            onnx.save_model(proto, tmp)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    else:
        onnx.save_model(proto, str(out), save_as_external_data=True, location=out.name + ".data")


def export_onnx(model: nn.Module, out: str | os.PathLike, *, precision: str = "fp32", input_size: int | None = None,
                opset: int = DEFAULT_OPSET, verify: bool = True, calibration: torch.Tensor | None = None) -> Path:
    """Export ``model`` to ``out``; with ``verify`` the graph (not bf16) is run once by ONNX Runtime.

    ``calibration`` ([N, 3, S, S] normalized patches) sets the FP8 activation ranges; without it
    random normal images are used, which is only good enough for testing the graph.
    """
    import onnx

    from gpfm_engine.backends import qdq

    if opset < 17:
        raise GpfmError(f"opset {opset} is too old: LayerNormalization needs >= 17")
    out = Path(out)
    wrapped = prepare_for_export(model, precision, input_size)
    size = wrapped.model.img_size if hasattr(wrapped.model, "img_size") else input_size
    dtype = PRECISIONS[precision]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    if precision == "fp8":
        opset = max(opset, qdq.QDQ_OPSET)
    program = _trace(wrapped, example, opset)
    program.model.metadata_props.update(_metadata(model, precision, size))
    proto = program.model_proto
    if precision == "fp8":
        if calibration is None:
            log.warning("FP8 export without calibration data: activation ranges come from random images")
            calibration = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
        batches = [b.float().numpy() for b in calibration.split(8)]
        proto = qdq.insert_fp8_qdq(proto, qdq.calibrate_amax(proto, batches, INPUT_NAME))
    onnx.checker.check_model(proto)
    _save(proto, out)
    log.info("exported %s (%s, opset %d, input %d px) to %s", getattr(getattr(model, "cfg", None), "name", "model"),
             precision, opset, size, out)
    if verify and precision != "bf16":  # ONNX Runtime's CPU provider has no bf16 kernels
        verify_onnx(out, wrapped, example, max_rel_err=1e-4 if precision == "fp32" else None)
    return out


def verify_onnx(path: Path, wrapped: nn.Module, example: torch.Tensor, max_rel_err: float | None) -> float:
    """Run the graph in ONNX Runtime next to PyTorch; returns max|a-b| / max|b| (raises above the limit)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
    with torch.inference_mode():
        ref = wrapped(example).numpy()
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
    log.info("%s: ONNX Runtime vs PyTorch relative error %.2e", path, err)
    if max_rel_err is not None and not err <= max_rel_err:
        raise GpfmError(f"{path}: ONNX Runtime output differs from PyTorch (relative error {err:.2e} > {max_rel_err:g})")
    return err


def export_model(name: str, out: str | os.PathLike, *, weights: str | os.PathLike | None = None, fmt: str = "onnx",
                 precision: str = "fp32", opset: int = DEFAULT_OPSET, verify: bool = True) -> Path:
    """``gpfm-engine export``: load a registered model with its weights and export it."""
    from gpfm_engine.models import load_model

    if fmt != "onnx":
        raise GpfmError(f"unknown export format '{fmt}'; TensorRT engines are built from the ONNX graph by "
                        "the tensorrt backend and cached")
    model = load_model(name, weights=weights)
    return export_onnx(model, out, precision=precision, opset=opset, verify=verify)
