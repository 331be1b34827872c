"""Backend options through the Python API: ``Engine(compile=..., cuda_graphs=..., backend_options=...)``;
buckets compiled when the backend is created; a failed compilation is an error when asked for and a
warning + eager model when it was only the default.

The auto rule itself is tested in test_backends.py, and compiled-vs-eager numerics (a real
inductor compile) in test_backends.py too; here ``torch.compile`` is replaced by a recorder so the
engine's bucketed path (pad the last partial batch, slice the output) runs at eager speed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _pipeline_utils import SMALL, tiny_weights  # noqa: F401 - fixture
from gpfm_engine import Engine
from gpfm_engine.errors import GpfmError


@pytest.fixture
def compile_calls(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def record(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", record)
    return calls


def test_cpu_defaults_are_eager(tiny_weights: Path) -> None:
    engine = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu")
    assert engine.backend_options == {"compile": False, "cuda_graphs": False}
    assert not engine.backend.compiled and engine.backend.buckets is None


def test_compile_reaches_the_backend_and_buckets_keep_features(tiny_weights: Path, slide_factory,
                                                                compile_calls: list[dict]) -> None:
    path = slide_factory(name="options-clean", **SMALL, seed=3)  # named: never another test's corrupted copy
    eager = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=8, workers=2).embed_slide(path)
    assert len(eager) % 8 != 0  # the last batch is partial: padded to its bucket, then sliced
    engine = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=8, workers=2, compile=True,
                    backend_options={"buckets": (4, 8)})
    assert engine.backend_options == {"compile": True, "cuda_graphs": False, "buckets": (4, 8)}
    assert compile_calls == [] and engine.backend.compiled and engine.backend.buckets == (4, 8)
    assert compile_calls == [{"mode": "default", "fullgraph": True, "dynamic": False}]
    got = engine.embed_slide(path)
    assert len(got) == len(eager)
    torch.testing.assert_close(got.features, eager.features, rtol=1e-5, atol=1e-5)


def test_impossible_requests_fail_before_weights_load(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(GpfmError, match="CUDA graphs need a CUDA device, not cpu"):
        Engine(model="gpfm-tiny", weights=missing, device="cpu", cuda_graphs=True)
    with pytest.raises(GpfmError, match="apply to the torch backend, not onnx"):
        Engine(model="gpfm-tiny", weights=missing, device="cpu", backend="onnx", compile=True)
    onnx = Engine(model="gpfm-tiny", weights=missing, device="cpu", backend="onnx", backend_options={"threads": 1})
    assert onnx.backend_options == {"threads": 1}


def _failing_compile(model, **kwargs):
    def broken(x):
        raise RuntimeError("inductor could not build a kernel\nsecond line")
    return broken


def test_compile_failure_falls_back_only_when_it_was_the_default(tiny_weights: Path, monkeypatch, caplog) -> None:
    import gpfm_engine.engine as engine_module

    monkeypatch.setattr(torch, "compile", _failing_compile)
    x = torch.zeros((3, 3, 224, 224))
    explicit = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=4, compile=True)
    with pytest.raises(GpfmError, match=r"torch.compile / CUDA graphs of gpfm-tiny failed: RuntimeError: inductor "
                                        r"could not build a kernel$"):
        explicit.backend
    # the CUDA default (simulated here on the CPU): a warning, then the eager model
    monkeypatch.setattr(engine_module, "torch_options",
                        lambda *a: {"compile": True, "cuda_graphs": False, "buckets": (4,)})
    auto = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=4)
    with caplog.at_level("WARNING"):
        backend = auto.backend
    assert "running the model eagerly" in caplog.text
    assert not backend.compiled and backend.buckets is None
    with torch.inference_mode():
        torch.testing.assert_close(backend.run(x), backend.model(x))


def test_buckets_are_ready_before_the_first_batch(tiny_weights: Path, compile_calls: list[dict], monkeypatch) -> None:
    from gpfm_engine.backends.torch_backend import TorchBackend

    seen: list[int] = []
    real = TorchBackend._run_bucketed
    monkeypatch.setattr(TorchBackend, "_run_bucketed", lambda self, chunk: seen.append(len(chunk)) or real(self, chunk))
    engine = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=64, compile=True)
    engine.backend
    assert seen == [16, 64]  # every bucket warmed up once, at creation
