"""TensorRT backend: a strongly typed engine built from the exported ONNX graph, cached on disk.

Facts this follows (research/gpu.md §2): TensorRT >= 10 Python API; strong typing (the only mode
in 11.x), so precision comes from the graph — ``gpfm_engine.export`` writes bf16/fp16 graphs with
float32 LayerNorm, or FP8 Q/DQ pairs on the linear layers; one optimization profile (min/opt/max
batch); plans are not portable, so the cache key holds everything a plan depends on (TensorRT
version, GPU name, compute capability, SM count, CUDA version, ONNX sha256, precision, profile,
optimization level) and a plan TensorRT refuses to deserialize is rebuilt; a timing cache per
TensorRT version and GPU makes rebuilds fast. Execution is on the caller's current CUDA stream
with torch tensors in and out (on the legacy default stream, TensorRT would add synchronisation,
so a side stream ordered by stream waits is used there).

``tensorrt`` is imported lazily: without it, ``require_tensorrt`` raises ``MissingExtraError``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from gpfm_engine.backends.base import Backend
from gpfm_engine.backends.cache import atomic_write_bytes, cache_dir
from gpfm_engine.errors import GpfmError, MissingExtraError
from gpfm_engine.models.registry import ModelCfg
from gpfm_engine.models.weights import sha256_file

log = logging.getLogger(__name__)

DEFAULT_PROFILE = (1, 256, 512)  # min / opt / max batch
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
_MIN_MAJOR = 10


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module (>= 10), or the one-line error that names the extra to install."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingExtraError("tensorrt", "tensorrt", "The TensorRT backend") from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < _MIN_MAJOR:
        raise GpfmError(f"TensorRT {trt.__version__} is too old: the TensorRT backend needs >= {_MIN_MAJOR}")
    return trt


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized plan depends on; its digest names the cached plan."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    sm_count: int
    cuda_version: str
    onnx_sha256: str
    precision: str
    profile: tuple[int, int, int]
    input_shape: tuple[int, int, int]
    opt_level: int

    def digest(self) -> str:
        """Stable hex digest of all fields (JSON with sorted keys)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def timing_digest(self) -> str:
        """Timing caches are valid per TensorRT version, GPU and CUDA, whatever the model."""
        parts = (self.trt_version, self.gpu_name, self.compute_capability, self.sm_count, self.cuda_version)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def current_engine_key(trt: ModuleType, device: torch.device, onnx_path: Path, precision: str,
                       profile: tuple[int, int, int], input_shape: tuple[int, int, int], opt_level: int) -> EngineKey:
    """The key for building ``onnx_path`` on ``device`` with the installed TensorRT."""
    props = torch.cuda.get_device_properties(device)
    return EngineKey(trt_version=str(trt.__version__), gpu_name=props.name,
                     compute_capability=(props.major, props.minor), sm_count=props.multi_processor_count,
                     cuda_version=str(torch.version.cuda), onnx_sha256=sha256_file(onnx_path), precision=precision,
                     profile=tuple(profile), input_shape=tuple(input_shape), opt_level=opt_level)


def _check_profile(profile: tuple[int, int, int]) -> tuple[int, int, int]:
    lo, opt, hi = (int(v) for v in profile)
    if not 1 <= lo <= opt <= hi:
        raise GpfmError(f"TensorRT profile must satisfy 1 <= min <= opt <= max, got {profile}")
    return lo, opt, hi


def build_plan(trt: ModuleType, onnx_path: Path, input_name: str, key: EngineKey, timing_cache: Path,
               workspace_bytes: int = 8 << 30) -> bytes:
    """Parse the ONNX graph into a strongly typed network and build a serialized plan."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # implied on 11.x
    network = builder.create_network(1 << int(flag) if flag is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GpfmError(f"{onnx_path}: TensorRT cannot parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = key.opt_level
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    lo, opt, hi = key.profile
    profile.set_shape(input_name, (lo, *key.input_shape), (opt, *key.input_shape), (hi, *key.input_shape))
    config.add_optimization_profile(profile)
    log.info("building a TensorRT engine from %s (%s, profile %s); this takes minutes once", onnx_path,
             key.precision, key.profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise GpfmError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
    atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def load_or_build_engine(trt: ModuleType, onnx_path: Path, input_name: str, key: EngineKey,
                         directory: Path | None = None) -> Any:
    """A deserialized ``ICudaEngine`` from the plan cache; built (and cached) on a miss or a stale plan."""
    directory = directory or cache_dir("tensorrt")
    plan_path = directory / f"{key.digest()}.plan"
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if plan_path.is_file():
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is not None:
            log.info("TensorRT engine from cache %s", plan_path)
            return engine
        log.warning("%s: TensorRT refused the cached plan; rebuilding", plan_path)
    plan = build_plan(trt, onnx_path, input_name, key, directory / f"timing-{key.timing_digest()}.cache")
    atomic_write_bytes(plan_path, plan)
    atomic_write_bytes(plan_path.with_suffix(".json"), json.dumps(asdict(key), indent=2).encode())
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise GpfmError(f"{plan_path}: TensorRT cannot deserialize the engine it just built")
    return engine


def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    try:
        return table[dtype]
    except KeyError:
        raise GpfmError(f"TensorRT engine I/O type {dtype} is not supported by the backend") from None


class TensorRTBackend(Backend):
    """Runs a cached TensorRT engine; batches above the profile's max are split."""

    name = "tensorrt"

    def __init__(self, onnx_path: str | os.PathLike, cfg: ModelCfg, device: str | torch.device = "cuda",
                 precision: str = "bf16", *, profile: tuple[int, int, int] = DEFAULT_PROFILE, opt_level: int = 3,
                 weights_sha256: str | None = None, cache: Path | None = None) -> None:
        trt = require_tensorrt()
        device = torch.device(device)
        if device.type != "cuda":
            raise GpfmError("the TensorRT backend needs a CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if precision not in PRECISIONS:
            raise GpfmError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
        self._trt = trt
        self.onnx_path = Path(onnx_path)
        self.profile = _check_profile(profile)
        shape = (3, cfg.input_size, cfg.input_size)
        with torch.cuda.device(device):
            self._input_name, self._output_name = self._io_names_from_onnx()
            self.key = current_engine_key(trt, device, self.onnx_path, precision, self.profile, shape, opt_level)
            self.engine = load_or_build_engine(trt, self.onnx_path, self._input_name, self.key, cache)
            self.context = self.engine.create_execution_context()
        input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._input_name))
        self._output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._output_name))
        self._side_stream: torch.cuda.Stream | None = None
        super().__init__(cfg, device, precision, input_dtype, weights_sha256)

    def _io_names_from_onnx(self) -> tuple[str, str]:
        import onnx

        graph = onnx.load(str(self.onnx_path), load_external_data=False).graph
        return graph.input[0].name, graph.output[0].name

    @classmethod
    def from_model(cls, model: nn.Module, device: str | torch.device = "cuda", precision: str = "bf16",
                   **options: Any) -> "TensorRTBackend":
        """Export (or reuse the cached export of) ``model`` in ``precision`` and build/load its engine."""
        from gpfm_engine.backends.onnx_backend import cached_onnx

        require_tensorrt()
        return cls(cached_onnx(model, precision), model.cfg, device, precision,
                   weights_sha256=getattr(model, "weights_sha256", None), **options)

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        outs = [self._execute(chunk.contiguous()) for chunk in batch.split(self.profile[2])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _execute(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((x.shape[0], self.feature_dim), dtype=self._output_dtype, device=self.device)
        ctx = self.context
        ctx.set_input_shape(self._input_name, tuple(x.shape))
        ctx.set_tensor_address(self._input_name, x.data_ptr())
        ctx.set_tensor_address(self._output_name, out.data_ptr())
        current = torch.cuda.current_stream(self.device)
        stream = current
        if current.cuda_stream == 0:  # legacy default stream: TensorRT would synchronise on every call
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            stream = self._side_stream
            stream.wait_stream(current)
            x.record_stream(stream)
            out.record_stream(stream)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise GpfmError(f"TensorRT execution failed for a batch of {x.shape[0]} ({self.onnx_path.name})")
        if stream is not current:
            current.wait_stream(stream)
        return out.float()

    def describe(self) -> dict:
        return super().describe() | {"engine_key": asdict(self.key), "engine_digest": self.key.digest()}
