"""Thin typed front of the compiled kernels in :mod:`gpfm_engine._core`.

Arrays cross into C++ without copies (buffer protocol on the host, DLPack on CUDA); outputs are
allocated here by the caller's framework so that PyTorch's allocator owns them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from gpfm_engine import _core

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_info() -> dict[str, Any]:
    """What the extension was compiled with, and whether CUDA is usable on this machine."""
    return dict(_core.build_info())


def current_stream(tensor: torch.Tensor) -> int:
    """The raw cudaStream_t of torch's current stream for a CUDA tensor, -1 for host tensors."""
    if tensor.is_cuda:
        return int(torch.cuda.current_stream(tensor.device).cuda_stream)
    return -1


def normalize_to_nchw(
    images: np.ndarray | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> normalized [N, 3, H, W] model input, in one pass.

    Runs on the device the images live on (CUDA tensors stay on their device, on torch's current
    stream). ``out`` lets the caller write straight into a preallocated backend input buffer.
    """
    src = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if src.ndim == 3:
        src = src.unsqueeze(0)
    n, h, w, _ = src.shape
    if out is None:
        out = torch.empty((n, 3, h, w), dtype=dtype, device=src.device)
    _core.normalize_to_nchw(src, out, list(mean), list(std), current_stream(out))
    return out
