"""NVIDIA DALI: spliced JPEG tile streams fed through an external source into ``fn.decoders.image``.

With ``device="cuda"`` the decoder runs DALI's "mixed" backend: nvImageCodec's hardware JPEG
engines when the GPU has them (``hw_decoder_load`` is the share of each batch sent there), CUDA
decoding for the rest, batched. ``run(cuda_stream=...)`` binds the outputs to the engine stream,
so what follows on that stream needs no host wait. Under DALI's default (dynamic) executor an
output outlives the next iteration, so a dense batch is handed on through DLPack without a copy
(a batch DALI laid out sample by sample is stacked in one device copy).

``device="cpu"`` builds the same pipeline with DALI's CPU decoder and ``device_id=None``; it needs
no GPU or driver, which is how CI checks the pipeline's plumbing and colours.

DALI keeps a process-wide GPU memory pool that it never gives back (NVIDIA/DALI#4653): budget it
beside PyTorch's allocator.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch

from gpfm_engine.decode.gpu import GpuDecoder, stack_tiles
from gpfm_engine.errors import MissingExtraError

PACKAGE = "nvidia-dali-cuda130"


def _import_dali() -> SimpleNamespace:
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as exc:
        raise MissingExtraError(PACKAGE, "gpu", "DALI tile decoding") from exc
    return SimpleNamespace(Pipeline=Pipeline, fn=fn, types=types)


def define_pipeline(dali: SimpleNamespace, *, batch_size: int, num_threads: int, device_id: int | None,
                    hw_decoder_load: float, fancy_upsampling: bool):
    """The decode graph, not yet built: encoded bytes from an external source into ``decoders.image``,
    "mixed" (GPU) for a device id, "cpu" for ``device_id=None``."""
    cuda = device_id is not None
    # prefetch_queue_depth=1: each run() decodes exactly the batch handed to it.
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    with pipe:
        enc = dali.fn.external_source(name="enc", dtype=dali.types.UINT8, ndim=1)
        options = {"hw_decoder_load": hw_decoder_load, "jpeg_fancy_upsampling": fancy_upsampling} if cuda else {}
        pipe.set_outputs(dali.fn.decoders.image(enc, device="mixed" if cuda else "cpu", output_type=dali.types.RGB,
                                                **options))
    return pipe


class DaliDecoder(GpuDecoder):
    """Batched JPEG tile decode through a DALI pipeline fed from Python."""

    name = "dali"
    package = PACKAGE

    def __init__(self, device: torch.device | str = "cuda", batch_size: int = 256, num_threads: int = 2,
                 hw_decoder_load: float = 0.9, fancy_upsampling: bool = True) -> None:
        super().__init__(device)
        self._dali = _import_dali()
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.hw_decoder_load = hw_decoder_load
        self.fancy_upsampling = fancy_upsampling  # libjpeg-turbo's chroma upsampling, as the CPU decoder
        self._pipe = self._build()

    def _build(self):
        pipe = define_pipeline(self._dali, batch_size=self.batch_size, num_threads=self.num_threads,
                               device_id=self.device.index if self.device.type == "cuda" else None,
                               hw_decoder_load=self.hw_decoder_load, fancy_upsampling=self.fancy_upsampling)
        pipe.build()
        return pipe

    def _run(self, chunk: list[np.ndarray]) -> torch.Tensor:
        if self.device.type == "cuda":
            (tiles,) = self._pipe.run(torch.cuda.current_stream(self.device).cuda_stream, enc=chunk)
        else:
            (tiles,) = self._pipe.run(enc=chunk)
        if tiles.is_dense_tensor():  # one buffer: zero copy
            return torch.from_dlpack(tiles.as_tensor())
        return stack_tiles([torch.from_dlpack(tiles[i]) for i in range(len(tiles))])

    def _decode_batch(self, streams: Sequence[bytes]) -> torch.Tensor:
        parts = []
        for start in range(0, len(streams), self.batch_size):
            chunk = [np.frombuffer(s, dtype=np.uint8) for s in streams[start:start + self.batch_size]]
            try:
                parts.append(self._run(chunk))
            except Exception:
                # DALI declares a pipeline invalid after an operator error: start a fresh one.
                self._pipe = self._build()
                raise
        return parts[0] if len(parts) == 1 else torch.cat(parts)
