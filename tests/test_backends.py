"""Backends: torch (fp32/bf16, buckets), ONNX export + ONNX Runtime, TensorRT around the builder.

Tolerances: ONNX Runtime vs torch fp32 max|a-b| / max|b| <= 1e-4; torch bf16 vs fp32 and the fp16
graph vs torch fp32 cosine >= 0.999 per row; the FP8 Q/DQ graph cosine >= 0.99 per row.
TensorRT cannot be installed here (its builder wheels come from NVIDIA's index, research/gpu.md
§0): the cache key, the plan cache logic (against a stand-in module) and the missing-package
error are tested; building and running engines needs a GPU machine.
"""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from _model_utils import randomize
from click.testing import CliRunner
from safetensors.torch import save_file

from gpfm_engine.backends import choose_backend, create_backend, onnx_backend, tensorrt_backend, torch_options
from gpfm_engine.backends.onnx_backend import OnnxBackend, cached_onnx
from gpfm_engine.backends.tensorrt_backend import EngineKey, load_or_build_engine, require_tensorrt
from gpfm_engine.backends.torch_backend import TorchBackend, buckets_for
from gpfm_engine.cli import main as cli
from gpfm_engine.errors import GpfmError, MissingExtraError
from gpfm_engine.export import export_onnx
from gpfm_engine.models import build_model, get_model_cfg

TINY = "gpfm-tiny"


def _images(n: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).min())


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("GPFM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gpfm-cache"))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return randomize(build_model(TINY), seed=11).eval()


@pytest.fixture(scope="module")
def tiny_weights(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file(tiny.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    """Registered gpfm-tiny cfg, one block, pos-embed laid out for 112 px (exported at 224)."""
    return randomize(build_model(TINY, depth=1, img_size=112), seed=12).eval()


# --- torch ------------------------------------------------------------------------------------------


def test_torch_fp32_is_the_model_and_checks_batches(tiny):
    backend = TorchBackend(tiny, "cpu", "fp32")
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(backend.run(x), tiny(x))
    assert backend.run(x.double()).dtype == torch.float32
    assert backend.run(x[:0]).shape == (0, 192)
    with pytest.raises(GpfmError, match=r"expects \[N, 3, 224, 224\] batches, got \[2, 3, 98, 98\]"):
        backend.run(_images(2, 98))
    assert backend.describe()["precision"] == "fp32" and backend.input_dtype == torch.float32


def test_torch_bf16_cosine_to_fp32(tiny):
    ref = TorchBackend(tiny, "cpu", "fp32").run(_images(4))
    low = TorchBackend(randomize(build_model(TINY), seed=11), "cpu", "bf16")
    assert low.input_dtype == torch.bfloat16
    assert _min_cos(low.run(_images(4)), ref) >= 0.999


def test_torch_buckets_pad_and_split(tiny):
    eager = TorchBackend(tiny, "cpu", "fp32").run(_images(11))
    bucketed = TorchBackend(tiny, "cpu", "fp32", buckets=(4, 8))
    assert [bucketed.bucket_for(n) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    out = bucketed.run(_images(11))  # 8 + 3 (padded to 4)
    assert out.shape == (11, 192) and (out - eager).abs().max() <= 1e-5


def test_torch_refuses_cpu_fp16_and_cpu_graphs(tiny):
    with pytest.raises(GpfmError, match="fp32 or bf16 on CPU"):
        TorchBackend(tiny, "cpu", "fp16")
    with pytest.raises(GpfmError, match="CUDA graphs need a CUDA device"):
        TorchBackend(tiny, "cpu", "fp32", cuda_graphs=True)
    with pytest.raises(GpfmError, match="unknown precision 'int8'"):
        TorchBackend(tiny, "cpu", "int8")


def test_buckets_for_batch_size():
    assert buckets_for(64) == (16, 64)
    assert buckets_for(256) == (64, 256)
    assert buckets_for(63) == (63,)
    assert buckets_for(100) == (25, 100)
    with pytest.raises(GpfmError, match="positive"):
        buckets_for(0)


def test_torch_options_auto_rule(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else
                        real_find_spec(name, *a))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert torch_options(cpu, "torch", 64) == {"compile": False, "cuda_graphs": False}
    assert torch_options(cuda, "torch", 64) == {"compile": True, "cuda_graphs": True, "buckets": (16, 64)}
    assert torch_options(cpu, "torch", 64, compile=True) == {"compile": True, "cuda_graphs": False, "buckets": (16, 64)}
    assert torch_options(cuda, "torch", 256, compile=False) == {"compile": False, "cuda_graphs": True,
                                                                "buckets": (64, 256)}
    assert torch_options(cuda, "tensorrt", 64) == {} and torch_options(cpu, "onnx", 64, compile=False) == {}
    with pytest.raises(GpfmError, match="CUDA graphs need a CUDA device, not cpu"):
        torch_options(cpu, "torch", 64, cuda_graphs=True)
    # without Triton inductor has no CUDA kernels: auto keeps the graphs, not the compilation
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else
                        real_find_spec(name, *a))
    assert torch_options(cuda, "torch", 64) == {"compile": False, "cuda_graphs": True, "buckets": (16, 64)}
    with pytest.raises(GpfmError, match="apply to the torch backend, not onnx"):
        torch_options(cpu, "onnx", 64, compile=True)


CXX = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.skipif(CXX is None, reason="torch.compile's inductor needs a C++ compiler for CPU kernels")
def test_torch_compile_matches_eager_on_cpu(tiny):
    """torch.compile (inductor) through the bucketed path: 3 rows padded to a bucket of 4, compiled
    once (fixed shape, fullgraph). Tolerance: max|a-b| / max|b| <= 1e-4 (fused kernels reorder sums).
    One block keeps the compilation to ~15 s on 2 shared cores."""
    from torch._dynamo.utils import counters

    one_block = randomize(build_model(TINY, depth=1), seed=13).eval()
    x = _images(3)
    with torch.inference_mode():
        eager = one_block(x)
    compiled = TorchBackend(one_block, "cpu", "fp32", compile=True, buckets=(4,))
    assert compiled.describe()["compile"] and compiled.buckets == (4,)
    got = compiled.run(x)
    assert got.shape == (3, 192)
    assert _rel_err(got, eager) <= 1e-4
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # it was compiled, not run eagerly
    assert _rel_err(compiled.run(x[:2]), eager[:2]) <= 1e-4
    assert counters["stats"]["unique_graphs"] == graphs  # same bucket: no second compilation


# --- ONNX -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_onnx(tiny_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "gpfm-tiny.onnx"
    # --no-verify: test_onnx_runtime_matches_torch_fp32_at_dynamic_batch does the comparison.
    result = CliRunner().invoke(cli, ["export", "--model", TINY, "--weights", str(tiny_weights), "--no-verify",
                                      str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_exported_graph_shape_opset_and_no_resize(cli_onnx):
    model = onnx.load(str(cli_onnx))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 224]
    ops = {n.op_type for n in model.graph.node}
    assert "LayerNormalization" in ops and "Resize" not in ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["gpfm.model"] == TINY and meta["gpfm.precision"] == "fp32" and len(meta["gpfm.weights_sha256"]) == 64


def test_onnx_runtime_matches_torch_fp32_at_dynamic_batch(cli_onnx, tiny):
    backend = OnnxBackend(cli_onnx, get_model_cfg(TINY))
    torch_backend = TorchBackend(tiny, "cpu", "fp32")
    for n in (1, 5):
        x = _images(n, seed=n)
        assert _rel_err(backend.run(x), torch_backend.run(x)) <= 1e-4


def test_pos_embed_is_baked_for_the_export_size(small):
    path = cached_onnx(small)  # model laid out for 112 px, cfg says 224
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Resize" not in ops
    x = _images(2)
    with torch.no_grad():
        ref = small(x)  # interpolates the 8x8 pos-embed to 16x16 on the fly
    got = OnnxBackend(path, small.cfg).run(x)
    assert _rel_err(got, ref) <= 1e-4
    assert small.img_size == 112  # the export worked on a copy


def test_fp16_graph_runs_in_onnx_runtime_with_fp32_layernorm(small, tmp_path):
    path = export_onnx(small, tmp_path / "fp16.onnx", precision="fp16")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    backend = OnnxBackend(path, small.cfg)
    assert backend.input_dtype == torch.float16
    with torch.no_grad():
        ref = small(_images(3))
    assert _min_cos(backend.run(_images(3)), ref) >= 0.999


def test_bf16_graph_is_valid_and_keeps_layernorm_in_fp32(small, tmp_path):
    path = export_onnx(small, tmp_path / "bf16.onnx", precision="bf16")  # ORT's CPU provider has no bf16 kernels
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    types_ = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types_.update({i.name: i.data_type for i in model.graph.initializer})
    ln_inputs = [n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert ln_inputs and all(types_.get(t) == onnx.TensorProto.FLOAT for t in ln_inputs)
    with pytest.raises(GpfmError, match="cannot run on ONNX Runtime's CPU provider|cannot load the graph"):
        OnnxBackend(path, small.cfg)


def test_fp8_qdq_graph_quantizes_every_linear_layer(tmp_path):
    model = randomize(build_model(TINY, depth=2), seed=13).eval()
    for blk in model.blocks:  # trained-like residual scales keep the FP8 error in proportion
        blk.ls1.gamma.data.mul_(0.1)
        blk.ls2.gamma.data.mul_(0.1)
    calib = _images(8, seed=3)
    path = export_onnx(model, tmp_path / "fp8.onnx", precision="fp8", calibration=calib)
    graph = onnx.load(str(path))
    quant = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quant) == 2 * 4 * 2  # activation + weight for qkv, proj, fc1, fc2 in each of 2 blocks
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 19
    with torch.no_grad():
        ref = model(_images(4, seed=4))
    assert _min_cos(OnnxBackend(path, model.cfg).run(_images(4, seed=4)), ref) >= 0.99


def test_onnx_exports_are_cached(small, monkeypatch):
    first = cached_onnx(small)
    monkeypatch.setattr("gpfm_engine.export.export_onnx", lambda *a, **k: pytest.fail("exported twice"))
    assert cached_onnx(small) == first and first.parent.name == "onnx"
    assert OnnxBackend.from_model(small).onnx_path == first


# --- the factory ------------------------------------------------------------------------------------


def test_create_backend_auto_torch_and_onnx(tiny_weights, tiny, cli_onnx, monkeypatch):
    backend = create_backend("auto", TINY, weights=tiny_weights, device="cpu")
    assert isinstance(backend, TorchBackend) and backend.weights_sha256 and backend.cfg.name == TINY
    monkeypatch.setattr(onnx_backend, "cached_onnx", lambda model, precision: cli_onnx)
    onnx_b = create_backend("onnx", TINY, weights=tiny_weights)
    assert isinstance(onnx_b, OnnxBackend)
    x = _images(2)
    assert _rel_err(onnx_b.run(x), backend.run(x)) <= 1e-4
    with pytest.raises(GpfmError, match="unknown backend 'jax'"):
        create_backend("jax", TINY, weights=tiny_weights)
    with pytest.raises(GpfmError, match="onnx backend runs fp32"):
        create_backend("onnx", TINY, weights=tiny_weights, precision="bf16")


def test_auto_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "tensorrt" else None)
    assert choose_backend(cpu, "bf16") == "torch"
    assert choose_backend(cuda, "fp32") == "torch"
    assert choose_backend(cuda, "bf16") == "tensorrt"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert choose_backend(cuda, "bf16") == "torch"


# --- TensorRT, everything around the builder --------------------------------------------------------


def test_missing_tensorrt_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails even where TensorRT is installed
    with pytest.raises(MissingExtraError, match=r"needs the 'tensorrt' package: pip install 'gpfm-engine\[tensorrt\]'"):
        require_tensorrt()
    # Fails before looking for the (absent) GPFM weights, which would take minutes to load.
    with pytest.raises(MissingExtraError):
        create_backend("tensorrt", "gpfm", device="cpu", precision="bf16")


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(GpfmError, match="TensorRT 8.6.1 is too old"):
        require_tensorrt()


def _key(**changes) -> EngineKey:
    base = dict(trt_version="10.13.0", gpu_name="NVIDIA H200", compute_capability=(9, 0), sm_count=132,
                cuda_version="13.0", onnx_sha256="ab" * 32, precision="bf16", profile=(1, 256, 512),
                input_shape=(3, 224, 224), opt_level=3)
    return EngineKey(**(base | changes))


def test_engine_key_covers_everything_a_plan_depends_on():
    base = _key()
    assert base.digest() == _key().digest() and len(base.digest()) == 32
    changes = dict(trt_version="11.4.0", gpu_name="NVIDIA H100", compute_capability=(8, 9), sm_count=114,
                   cuda_version="12.8", onnx_sha256="cd" * 32, precision="fp8", profile=(1, 64, 256),
                   input_shape=(3, 256, 256), opt_level=5)
    digests = {base.digest()} | {_key(**{k: v}).digest() for k, v in changes.items()}
    assert len(digests) == 1 + len(changes)
    # timing caches are shared across models and precisions of one TensorRT + GPU + CUDA
    assert _key(onnx_sha256="cd" * 32, precision="fp16").timing_digest() == base.timing_digest()
    assert _key(gpu_name="NVIDIA H100").timing_digest() != base.timing_digest()


class _FakeTrt:
    """Stand-in for the tensorrt module: records builds, 'serializes' plans as bytes."""

    __version__ = "10.13.0"

    def __init__(self):
        self.builds = 0
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return None if plan == b"stale" else ("engine", bytes(plan))

        self.Logger, self.Runtime = Logger, Runtime

        def build_plan(trt, onnx_path, input_name, key, timing_cache, workspace_bytes=0):
            fake.builds += 1
            timing_cache.write_bytes(b"timing")
            return b"plan:" + key.digest().encode()

        self.build_plan = build_plan


def test_plan_cache_builds_once_reuses_and_rebuilds_stale_plans(monkeypatch, tmp_path):
    trt = _FakeTrt()
    monkeypatch.setattr(tensorrt_backend, "build_plan", trt.build_plan)
    key = _key()
    engine = load_or_build_engine(trt, tmp_path / "m.onnx", "images", key, tmp_path)
    assert trt.builds == 1 and engine == ("engine", b"plan:" + key.digest().encode())
    plan = tmp_path / f"{key.digest()}.plan"
    assert plan.is_file() and plan.with_suffix(".json").is_file()
    assert (tmp_path / f"timing-{key.timing_digest()}.cache").is_file()
    load_or_build_engine(trt, tmp_path / "m.onnx", "images", key, tmp_path)
    assert trt.builds == 1  # served from the cache
    load_or_build_engine(trt, tmp_path / "m.onnx", "images", _key(precision="fp16"), tmp_path)
    assert trt.builds == 2  # another key, another plan
    plan.write_bytes(b"stale")  # e.g. written by another TensorRT version
    assert load_or_build_engine(trt, tmp_path / "m.onnx", "images", key, tmp_path)[0] == "engine"
    assert trt.builds == 3 and plan.read_bytes() != b"stale"


def test_tensorrt_backend_needs_cuda(monkeypatch, tiny):
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTrt())
    with pytest.raises(GpfmError, match="needs a CUDA device"):
        tensorrt_backend.TensorRTBackend(Path("x.onnx"), tiny.cfg, device="cpu")
