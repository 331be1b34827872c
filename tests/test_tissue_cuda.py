"""CUDA tissue launchers equal the CPU launchers bit for bit (both run the functions of gpfm/tissue.h).

Skipped where no CUDA device is usable; the CPU side is checked against OpenCV in
test_tissue_kernels.py, so equality here carries that reference over to the GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tissue_reference as ref
from gpfm_engine import _core, kernels
from gpfm_engine.tissue import TissueParams, mask_thumbnail

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.build_info().get("cuda_usable")),
    reason="needs a CUDA device and a _core built with the CUDA launchers",
)


def on_gpu(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    thumb = ref.tissue_image(1536, 1152, feature_scale=12)[::2, ::2]
    noisy = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    rgba = np.concatenate([thumb, rng.integers(0, 256, (*thumb.shape[:2], 1), dtype=np.uint8)], axis=2)
    return [np.ascontiguousarray(thumb), noisy, rgba, noisy[:1, :1]]


@pytest.mark.parametrize("params", [TissueParams(), TissueParams(threshold=30, median_um=88, close_um=200),
                                    TissueParams(median_um=24, open_um=0, min_tissue_um2=0)])
def test_whole_chain_matches_cpu(params: TissueParams) -> None:
    for image in images():
        cpu = mask_thumbnail(image, (8.0, 8.0), params)
        gpu = mask_thumbnail(on_gpu(image), (8.0, 8.0), params)
        torch.cuda.synchronize()
        assert gpu[2] == cpu[2]
        assert np.array_equal(gpu[0].cpu().numpy(), cpu[0]) and np.array_equal(gpu[1].cpu().numpy(), cpu[1])


def test_each_step_matches_cpu() -> None:
    rng = np.random.default_rng(1)
    image = images()[0]
    plane = rng.integers(0, 256, (211, 157), dtype=np.uint8)
    mask = (plane > 128).astype(np.uint8)

    def both(fn, src, *args, shape=None, dtype=np.uint8):
        shape = shape or src.shape[:2]
        out_cpu = np.empty(shape, dtype)
        fn(src, out_cpu, *args)
        out_gpu = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
        fn(on_gpu(src), out_gpu, *args)
        torch.cuda.synchronize()
        assert np.array_equal(out_gpu.cpu().numpy(), out_cpu), fn.__name__

    both(_core.tissue_score, image, 20)
    for k in (1, 3, 5, 7, 9, 15):
        both(_core.median_blur, plane, k)
    for op in ("dilate", "erode", "close", "open"):
        for k in (1, 3, 9, 31):
            both(_core.morphology, mask, op, k)
    both(_core.filter_components, mask, 20, 20)
    both(_core.integral_image, mask, shape=(212, 158), dtype=np.int32)
    both(_core.histogram256, plane, shape=(256,), dtype=np.int64)
