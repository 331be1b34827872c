"""nvJPEG through torchvision: ``torchvision.io.decode_jpeg(list_of_streams, device="cuda")``.

torchvision's batched CUDA path runs nvJPEG's hardware engine when the GPU has one (A100, H100,
H200) and its CUDA decoder otherwise, on torch's current stream — the engine stream here. It is the
GPU decoder that needs nothing beyond torchvision, which most CUDA installations of torch carry.
It returns CHW tensors per tile; we lay them out as one ``[T, h, w, 3]`` batch in one copy.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gpfm_engine.decode.gpu import GpuDecoder, stack_tiles
from gpfm_engine.errors import GpfmError, MissingExtraError


class TorchvisionMissing(MissingExtraError):
    """torchvision is absent or broken. No extra of ours can fix that: it must be the build made for
    the installed torch, from the same index, or pip replaces torch itself."""

    def __init__(self, cause: Exception) -> None:
        GpfmError.__init__(self, f"nvJPEG tile decoding needs torchvision built for torch {torch.__version__} "
                                 f"(install it from the index torch came from): {type(cause).__name__}: {cause}")


def _torchvision_io():
    try:
        from torchvision import io
    except Exception as exc:  # noqa: BLE001 - ImportError, or a torchvision built for another torch
        raise TorchvisionMissing(exc) from exc
    return io


class TorchvisionNvjpegDecoder(GpuDecoder):
    """Batched nvJPEG decode of JPEG tiles on a CUDA device."""

    name = "nvjpeg"
    package = "torchvision"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        super().__init__(device)
        if self.device.type != "cuda":
            raise GpfmError(f"nvjpeg decoder needs a CUDA device, not {self.device}")
        self._io = _torchvision_io()

    def _decode_batch(self, streams: Sequence[bytes]) -> torch.Tensor:
        data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
        chw = self._io.decode_jpeg(data, mode=self._io.ImageReadMode.RGB, device=self.device)
        return stack_tiles([t.permute(1, 2, 0) for t in chw])
