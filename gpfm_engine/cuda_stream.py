"""The engine's CUDA stream: one per device, shared by the tile decoder, the kernels and the backend.

Why one stream: every GPU stage of a batch (decode → gather → model → copy of the features to the
host) is then ordered by the stream itself, so no stage needs a host synchronisation or an event
to wait for the previous one, and tensors made by one stage are safe to read in the next without
``record_stream`` bookkeeping. The host only ever waits in one place: when the writer needs the
features of a batch on the CPU (:meth:`HostCopy.wait`), long after the GPU has moved on.

torch's "current stream" is per thread, so every function here that enqueues work enters the
engine stream itself (:func:`on_engine_stream`); callers in worker threads need do nothing.
On CPU devices every function degrades to the plain host operation.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from gpfm_engine.errors import GpfmError


def cuda_kernels_usable() -> bool:
    """Whether the compiled extension carries CUDA launchers and finds a device here."""
    from gpfm_engine.kernels import build_info

    return bool(build_info()["cuda_usable"])


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when both torch and our CUDA kernels can use it, else CPU.

    An explicit CUDA request on a machine or build that cannot serve it is an error, not a silent
    fall back to the CPU (a run that was meant to take minutes would take days).
    """
    if str(device) == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() and cuda_kernels_usable() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GpfmError(f"device {dev} requested but torch {torch.__version__} sees no CUDA device")
        if not cuda_kernels_usable():
            raise GpfmError(f"device {dev} requested but gpfm_engine._core was built without CUDA "
                            "(rebuild with nvcc on PATH, GPFM_CUDA=ON)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@functools.lru_cache(maxsize=None)
def _stream_for(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


def engine_stream(device: torch.device | str) -> torch.cuda.Stream:
    """The process-wide engine stream of a CUDA device (created on first use, never the default stream)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise GpfmError(f"engine_stream: {dev} is not a CUDA device")
    return _stream_for(dev.index if dev.index is not None else torch.cuda.current_device())


def stream_handle(device: torch.device | str) -> int:
    """Raw ``cudaStream_t`` of the engine stream, for decoders and kernels that take an int; -1 on CPU."""
    dev = torch.device(device)
    return int(engine_stream(dev).cuda_stream) if dev.type == "cuda" else -1


@contextlib.contextmanager
def on_engine_stream(device: torch.device | str) -> Iterator[torch.cuda.Stream | None]:
    """Make the engine stream torch's current stream (and ``device`` the current device) in this thread."""
    dev = torch.device(device)
    if dev.type != "cuda":
        yield None
        return
    stream = engine_stream(dev)
    with torch.cuda.device(stream.device), torch.cuda.stream(stream):
        yield stream


@functools.lru_cache(maxsize=None)
def _upload_stream_for(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a (pinned) host tensor to ``device`` so that engine-stream work can use it, without waiting.

    The copy runs on a second, upload-only stream, so it overlaps the model running on the engine
    stream (one stream would serialise them: ~5% of a ViT-L batch's time for CPU-decoded tiles);
    the engine stream waits for it on the device, never the host. ``record_stream`` tells torch's
    allocator that the engine stream uses the result, and torch's pinned-memory allocator keeps
    ``host`` alive until the copy is done.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return host
    engine = engine_stream(dev)
    side = _upload_stream_for(engine.device.index)
    with torch.cuda.device(engine.device), torch.cuda.stream(side):
        out = host.to(engine.device, non_blocking=True)
    engine.wait_stream(side)
    out.record_stream(engine)
    return out


def to_device(data: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host data (index arrays, images) on ``device`` without making the host wait for the GPU.

    A copy from pageable memory is synchronous, and ``torch.as_tensor(array, device=cuda)`` is such a
    copy: the host would stall until every kernel queued before it has run. Staged in pinned memory
    instead, the copy is only enqueued on the current stream (the engine stream in the pipeline);
    torch's pinned allocator keeps the staging block until the copy is done. CPU devices and tensors
    already on the device pass through.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(data)) if isinstance(data, np.ndarray) else data
    dev = torch.device(device)
    if dev.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(dev)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(dev, non_blocking=True)


def upload_tiles(tiles: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """Stack host-decoded tiles ``[h, w, 3]`` into one uint8 ``[T, h, w, 3]`` tensor on ``device``.

    On CUDA the tiles are stacked straight into pinned memory and :func:`upload`-ed.
    """
    dev = torch.device(device)
    if not tiles:
        return torch.empty((0, 0, 0, 3), dtype=torch.uint8, device=dev)
    shapes = {t.shape for t in tiles}
    if len(shapes) != 1:
        raise GpfmError(f"tiles of one batch differ in shape: {sorted(shapes)}")
    if dev.type != "cuda":
        return torch.from_numpy(np.stack(tiles))
    staging = torch.empty((len(tiles), *tiles[0].shape), dtype=torch.uint8, pin_memory=True)
    np.stack(tiles, out=staging.numpy())
    return upload(staging, dev)


@dataclass
class HostCopy:
    """A device→host copy in flight: ``wait()`` returns the host tensor once the copy has landed."""

    tensor: torch.Tensor
    event: torch.cuda.Event | None = None

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def to_host_async(tensor: torch.Tensor) -> HostCopy:
    """Start copying an engine-stream tensor into pinned host memory; the caller waits when it needs it.

    Meant for the writer: the main loop enqueues batch after batch and only the writer thread
    blocks, on the event of the batch it is about to store.
    """
    if not tensor.is_cuda:
        return HostCopy(tensor)
    with on_engine_stream(tensor.device):
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    return HostCopy(host, event)
