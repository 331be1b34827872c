"""NVIDIA nvImageCodec: batched JPEG tile decode on the GPU's hardware engines and CUDA cores.

The decoder is restricted to its GPU backends (hardware engine first, then CPU-Huffman + GPU IDCT,
which suits small tiles, then all-GPU), so a tile never silently takes a CPU path inside the
library; what it refuses comes back as ``None`` and the batch falls back to our CPU decoder.
``cuda_stream`` is the engine stream, and the images export through DLPack on that stream.
``fancy_upsampling`` (default on) asks for libjpeg-turbo's chroma upsampling, so 4:2:0 tiles match
the CPU decoder closely.

``device="cpu"`` uses nvImageCodec's CPU-only mode (``NVIMGCODEC_DEVICE_CPU_ONLY``), which needs no
driver: CI checks stream handling and colours with it.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import numpy as np
import torch

from gpfm_engine.decode.gpu import GpuDecoder, stack_tiles
from gpfm_engine.errors import GpfmError, MissingExtraError

PACKAGE = "nvidia-nvimgcodec-cu13"


def _import_nvimgcodec():
    try:
        return importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        raise MissingExtraError(PACKAGE, "gpu", "nvImageCodec tile decoding") from exc


class NvImageCodecDecoder(GpuDecoder):
    """Batched JPEG tile decode through ``nvimgcodec.Decoder``."""

    name = "nvimgcodec"
    package = PACKAGE

    def __init__(self, device: torch.device | str = "cuda", num_threads: int = 1, fancy_upsampling: bool = True) -> None:
        super().__init__(device)
        nv = self._nv = _import_nvimgcodec()
        if self.device.type == "cuda":
            backends = [nv.Backend(kind) for kind in (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.HYBRID_CPU_GPU,
                                                      nv.BackendKind.GPU_ONLY)]
            device_id = self.device.index
        else:
            backends = [nv.Backend(nv.BackendKind.CPU_ONLY)]
            device_id = nv.NVIMGCODEC_DEVICE_CPU_ONLY
        self._decoder = nv.Decoder(device_id=device_id, max_num_cpu_threads=num_threads, backends=backends,
                                   options=f":fancy_upsampling={int(fancy_upsampling)}")
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                       sample_format=nv.SampleFormat.I_RGB)

    def _decode_batch(self, streams: Sequence[bytes]) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else 0
        images = self._decoder.decode([self._nv.CodeStream(s) for s in streams], params=self._params,
                                      cuda_stream=stream)
        failed = [i for i, im in enumerate(images) if im is None]
        if failed:
            raise GpfmError(f"nvImageCodec could not decode {len(failed)} of {len(streams)} tiles (first: {failed[0]})")
        if cuda:
            return stack_tiles([torch.from_dlpack(im) for im in images])
        return torch.from_numpy(np.stack([np.asarray(im) for im in images]))
