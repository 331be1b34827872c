"""PyTorch backend: always available; eager, or ``torch.compile`` + CUDA graphs on fixed batch buckets.

CPU runs fp32 or bf16; CUDA runs fp32, fp16 or bf16 with SDPA choosing flash/cuDNN attention. With
``compile`` or ``cuda_graphs`` every batch is padded up to the smallest bucket that holds it (batches
larger than the largest bucket are split), so the compiled graph and the captured CUDA graphs see
only a few fixed shapes: no recompiles, no per-kernel launch overhead. Padding rows are computed
and dropped; ViT rows never interact, so they cannot change the real rows' features.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from gpfm_engine.backends.base import Backend, precision_dtype
from gpfm_engine.errors import GpfmError

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (16, 64, 256, 512)
SMALLEST_BUCKET = 16
_WARMUP_ITERS = 3


def buckets_for(batch_size: int) -> tuple[int, ...]:
    """Batch buckets for a pipeline that sends full batches of ``batch_size`` and one partial batch
    per slide: a quarter of the batch size (when that is at least 16 rows) and the batch size.

    Each bucket costs one compilation and one captured graph (made by ``warmup`` before the first
    slide: tens of seconds for ViT-L); two buckets bound the padding of a slide's last batch to
    under 3/4 of a batch, a few per cent of a slide's thousands of patches.
    """
    if batch_size < 1:
        raise GpfmError(f"batch size must be positive, got {batch_size}")
    quarter = batch_size // 4
    return (quarter, batch_size) if quarter >= SMALLEST_BUCKET else (batch_size,)


@dataclass
class _Captured:
    """One CUDA graph per bucket: replay reads ``static_in`` and writes ``static_out``."""

    graph: "torch.cuda.CUDAGraph"
    static_in: torch.Tensor
    static_out: torch.Tensor


class TorchBackend(Backend):
    """Runs an ``nn.Module`` (normalized NCHW -> [N, D]) on the caller's current stream.

    The backend takes the module over: it is moved and cast in place (``nn.Module.to``).
    """

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32", *,
                 compile: bool = False, cuda_graphs: bool = False, buckets: Sequence[int] | None = None,
                 compile_mode: str = "default") -> None:
        device = torch.device(device)
        dtype = precision_dtype(precision)
        if device.type == "cpu" and dtype == torch.float16:
            raise GpfmError("the torch backend runs fp32 or bf16 on CPU (fp16 has no fast CPU kernels)")
        if cuda_graphs and device.type != "cuda":
            raise GpfmError("CUDA graphs need a CUDA device")
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            raise GpfmError("the torch backend needs a registered model (model.cfg is missing)")
        super().__init__(cfg, device, precision, dtype, getattr(model, "weights_sha256", None))
        self.model = model.to(device=device, dtype=dtype).eval()
        self.compiled = compile
        self.cuda_graphs = cuda_graphs
        self._fn: Callable[[torch.Tensor], torch.Tensor] = self.model
        if compile:
            self._fn = torch.compile(self.model, mode=compile_mode, fullgraph=True, dynamic=False)
        wants_buckets = compile or cuda_graphs
        self.buckets = tuple(sorted(set(buckets or DEFAULT_BUCKETS))) if (buckets or wants_buckets) else None
        if self.buckets and self.buckets[0] < 1:
            raise GpfmError(f"batch buckets must be positive, got {self.buckets}")
        self._graphs: dict[int, _Captured] = {}
        self._pool = None

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.buckets is None:
                return self._fn(batch).float()
            outs = [self._run_bucketed(chunk) for chunk in batch.split(self.buckets[-1])]
            return outs[0] if len(outs) == 1 else torch.cat(outs)

    def bucket_for(self, n: int) -> int:
        """The smallest bucket holding ``n`` rows (``n`` at most the largest bucket)."""
        assert self.buckets is not None
        return next(b for b in self.buckets if b >= n)

    def _run_bucketed(self, chunk: torch.Tensor) -> torch.Tensor:
        n = chunk.shape[0]
        bucket = self.bucket_for(n)
        if self.cuda_graphs:
            cap = self._graphs.get(bucket) or self._capture(bucket)
            cap.static_in[:n].copy_(chunk)
            cap.graph.replay()
            return cap.static_out[:n].to(torch.float32, copy=True)  # the next replay overwrites static_out
        if n < bucket:
            chunk = torch.cat((chunk, chunk.new_zeros((bucket - n, *chunk.shape[1:]))))
        return self._fn(chunk)[:n].float()

    def warmup(self) -> None:
        """Compile (and capture) every bucket now rather than at its first batch: compiling ViT-L
        takes tens of seconds, which should neither stall a slide mid-stream nor fail one there."""
        if self.buckets is None:
            return
        with torch.inference_mode():
            for bucket in self.buckets:
                self._run_bucketed(torch.zeros((bucket, *self.input_shape), dtype=self.input_dtype, device=self.device))

    def use_eager(self) -> None:
        """Drop the compiled function, the captured graphs and the buckets: plain eager calls from
        now on (the engine's fallback when compilation fails and nobody asked for it explicitly)."""
        self._fn = self.model
        self.compiled = self.cuda_graphs = False
        self.buckets = None
        self._graphs.clear()
        self._pool = None

    def _capture(self, bucket: int) -> _Captured:
        """Warm up (compile, autotune, pick kernels) on a side stream, then capture one replayable graph."""
        log.info("capturing a CUDA graph for batch %d (%s, %s)", bucket, self.cfg.name, self.precision)
        static_in = torch.zeros((bucket, *self.input_shape), dtype=self.input_dtype, device=self.device)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_ITERS):
                self._fn(static_in)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # buckets replay one at a time: share memory
        graph = torch.cuda.CUDAGraph()
        # thread_local: the pipeline's loader and upload threads keep enqueuing work on other streams
        # during the capture; only this thread's calls may not disturb it.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self._fn(static_in)
        cap = _Captured(graph, static_in, static_out)
        self._graphs[bucket] = cap
        return cap

    def describe(self) -> dict:
        return super().describe() | {"compile": self.compiled, "cuda_graphs": self.cuda_graphs,
                                     "buckets": list(self.buckets) if self.buckets else None}
