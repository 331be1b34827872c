"""The CUDA launchers are compiled whenever the build could compile them.

CI has nvcc but no GPU: it cannot run the CUDA kernels, so the least it must prove is that they
compile and link into ``_core``. CMakeLists.txt enables CUDA when ``check_language(CUDA)`` finds
nvcc (GPFM_CUDA=AUTO); a build that silently fell back to CPU-only there would hide broken CUDA
sources, which is what these tests catch. Their math is covered by the CPU reference tests, since
both launchers share the same ``__host__ __device__`` functions.
"""
from __future__ import annotations

import os
import shutil

import pytest

from gpfm_engine import kernels


def nvcc_available() -> bool:
    """nvcc where CMake looks first: $CUDACXX, then PATH."""
    cudacxx = os.environ.get("CUDACXX")
    return bool(cudacxx and os.access(cudacxx, os.X_OK)) or shutil.which("nvcc") is not None


def test_build_info_reports_cuda_fields() -> None:
    info = kernels.build_info()
    for key in ("cuda_compiled", "cuda_usable", "cuda_device_count", "cuda_driver_version", "cuda_runtime_version"):
        assert key in info, key
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["cuda_usable"], bool)


@pytest.mark.skipif(not nvcc_available(), reason="nvcc not found: this build is CPU-only by design")
@pytest.mark.skipif(os.environ.get("GPFM_CUDA", "AUTO").upper() == "OFF", reason="GPFM_CUDA=OFF disables CUDA")
def test_cuda_launchers_compiled_when_nvcc_present() -> None:
    info = kernels.build_info()
    assert info["cuda_compiled"] is True, (
        "nvcc is on PATH but gpfm_engine._core was built without CUDA; rebuild "
        "(pip install --no-build-isolation -e .) and check CMake's 'gpfm:' messages")
    assert "NVIDIA" in info["cuda_compiler"]
    assert info["cuda_architectures"], "no CUDA architectures recorded"
    assert info["cuda_runtime_version"] > 0  # the statically linked runtime answers even without a driver


def test_cuda_usable_only_with_a_device() -> None:
    info = kernels.build_info()  # queried twice: the runtime probe must not leave a sticky error behind
    again = kernels.build_info()
    assert info["cuda_usable"] == again["cuda_usable"]
    if info["cuda_usable"]:
        assert info["cuda_compiled"] and info["cuda_device_count"] > 0 and info["cuda_driver_version"] > 0
    else:
        assert info["cuda_device_count"] == 0
