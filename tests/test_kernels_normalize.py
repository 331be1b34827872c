"""normalize_to_nchw against a plain PyTorch computation on random data.

Tolerances: float32 within 1e-6 absolute (one rounding of a fused multiply-add versus torch's
divide-subtract-divide); float16 and bfloat16 bit-identical to rounding the float32 reference,
since both paths round to nearest-even once from the same float.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpfm_engine import kernels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).double() / 255.0
    return ((x - torch.tensor(MEAN, dtype=torch.double)[:, None, None]) / torch.tensor(STD, dtype=torch.double)[:, None, None])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 29), (2, 224, 224), (5, 64, 3)])
def test_float32_matches_reference(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    images = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = kernels.normalize_to_nchw(images, MEAN, STD)
    assert out.shape == (shape[0], 3, shape[1], shape[2]) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_round_like_torch(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 31, 23, 3), dtype=np.uint8)
    out = kernels.normalize_to_nchw(images, MEAN, STD, dtype=dtype)
    ref32 = kernels.normalize_to_nchw(images, MEAN, STD)
    assert out.dtype == dtype
    assert torch.equal(out, ref32.to(dtype))


def test_strided_input_and_preallocated_output() -> None:
    rng = np.random.default_rng(2)
    big = rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    view = big[:, 5:37, 7:41]  # non-contiguous rows and batch
    out = torch.full((3, 3, 32, 34), float("nan"))
    result = kernels.normalize_to_nchw(torch.from_numpy(big)[:, 5:37, 7:41], MEAN, STD, out=out)
    assert result is out
    torch.testing.assert_close(out.double(), reference(np.ascontiguousarray(view)), rtol=0, atol=1e-6)


def test_read_only_numpy_input_is_accepted() -> None:
    images = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    images.setflags(write=False)
    out = torch.empty((2, 3, 8, 8))
    from gpfm_engine import _core

    _core.normalize_to_nchw(images, out, list(MEAN), list(STD))
    torch.testing.assert_close(out.double(), reference(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "src, dst, message",
    [
        (np.zeros((2, 8, 8, 4), np.uint8), torch.empty(2, 3, 8, 8), "packed channels"),
        (np.zeros((2, 8, 8, 3), np.float32), torch.empty(2, 3, 8, 8), "uint8"),
        (np.zeros((2, 8, 8, 3), np.uint8), torch.empty(2, 3, 8, 9), "matching src"),
        (np.zeros((2, 8, 8, 3), np.uint8), torch.empty(2, 3, 8, 8, dtype=torch.int32), "float32, float16 or bfloat16"),
    ],
)
def test_bad_arguments_are_clear_errors(src, dst, message: str) -> None:
    from gpfm_engine import _core

    with pytest.raises(ValueError, match=message):
        _core.normalize_to_nchw(src, dst, list(MEAN), list(STD))


def test_build_info_tells_the_truth() -> None:
    info = kernels.build_info()
    for key in ("compiler", "cuda_compiled", "cuda_usable", "cuda_architectures", "num_threads", "threading"):
        assert key in info
    if not info["cuda_compiled"]:
        assert info["cuda_usable"] is False
    assert info["cuda_usable"] == (info["cuda_device_count"] > 0)
    assert info["cuda_usable"] == torch.cuda.is_available() or not info["cuda_compiled"]
