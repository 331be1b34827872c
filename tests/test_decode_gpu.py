"""GPU decoder plug-ins, checked where no GPU is: their CPU variants, selection, fallbacks, errors.

DALI and nvImageCodec both run their decode pipelines on the CPU without a driver (DALI with
``device_id=None``, nvImageCodec in its CPU-only mode), so the plumbing a GPU run uses — streams
in, one ``[T, h, w, 3]`` tensor out, Aperio RGB colours, batches larger than the pipeline's —
is tested here against the CPU decoder (≤ 1 grey level). What only a GPU can show (nvJPEG's
hardware path, stream ordering) is measured by ``benchmarks/gpu_check.py``.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpfm_engine import cuda_stream
from gpfm_engine.decode import cpu
from gpfm_engine.decode import gpu as gpu_decode
from gpfm_engine.decode.gpu import GpuDecoder, create_gpu_decoder
from gpfm_engine.errors import GpfmError, MissingExtraError
from gpfm_engine.slide import open_slide
from gpfm_engine.synth import TissuePattern

REAL_APERIO = Path("wsi/aperio/CMU-1-Small-Region.svs")


def raw_tiles(path: Path, level: int = 0, limit: int = 24) -> tuple[list[bytes], str]:
    """Self-contained streams of the first ``limit`` stored tiles of a level, as the reader gives them."""
    with open_slide(path, backend="tiff") as slide:
        layout = slide.tile_layout(level)
        streams = slide.read_raw_tiles(level, list(range(min(limit, layout.count))))
    return streams, layout.compression


def cpu_reference(streams: list[bytes]) -> np.ndarray:
    return np.stack(cpu.decode(streams, "jpeg"))


def max_diff(a: torch.Tensor, b: np.ndarray) -> int:
    return int(np.abs(a.numpy().astype(np.int16) - b.astype(np.int16)).max())


@pytest.fixture(scope="module")
def slide_streams(slide_factory) -> dict[str, list[bytes]]:
    """Spliced tiles of a YCbCr and an Aperio-RGB synthesized slide."""
    out = {}
    for compression in ("jpeg", "jpeg_rgb"):
        streams, kind = raw_tiles(slide_factory(size=(1400, 1000), compression=compression))
        assert kind == "jpeg"
        out[compression] = streams
    return out


# --- the CPU variants of the GPU plug-ins ---------------------------------------------------------

PLUGINS = {
    "dali": ("nvidia.dali", "DALI wheel (nvidia-dali-cuda130, the [gpu] extra) not installed"),
    "nvimgcodec": ("nvidia.nvimgcodec", "nvImageCodec wheel (nvidia-nvimgcodec-cu13, the [gpu] extra) not installed"),
}


@pytest.fixture(scope="module", params=sorted(PLUGINS))
def cpu_variant(request) -> GpuDecoder:
    module, reason = PLUGINS[request.param]
    pytest.importorskip(module, reason=reason)
    options = {"batch_size": 16, "num_threads": 1} if request.param == "dali" else {}
    return create_gpu_decoder(request.param, "cpu", **options)


def test_cpu_variant_matches_cpu_decoder(cpu_variant: GpuDecoder, slide_streams: dict[str, list[bytes]]) -> None:
    for name, streams in slide_streams.items():
        got = cpu_variant.decode(streams, "jpeg")  # 24 tiles: more than one DALI batch of 16
        assert got.dtype == torch.uint8 and got.device.type == "cpu"
        ref = cpu_reference(streams)
        assert got.shape == ref.shape, name
        assert max_diff(got, ref) <= 1, name


@pytest.mark.realdata
def test_cpu_variant_matches_cpu_decoder_on_real_aperio(cpu_variant: GpuDecoder, shared_data: Path) -> None:
    """CMU-1-Small-Region.svs: Aperio JPEG tiles as a scanner wrote them."""
    path = shared_data / REAL_APERIO
    if not path.exists():
        pytest.skip(f"{REAL_APERIO} not in the shared data")
    streams, kind = raw_tiles(path, limit=40)
    assert kind == "jpeg"
    assert max_diff(cpu_variant.decode(streams, "jpeg"), cpu_reference(streams)) <= 1


def test_cpu_variant_keeps_aperio_rgb_colours(cpu_variant: GpuDecoder, slide_factory) -> None:
    """RGB-coded (Aperio) tiles decode to the pixels they were made from, within JPEG loss.

    A decoder that ignored the reader's RGB marking would treat near-white glass as YCbCr and
    return magenta, off by more than 100 grey levels.
    """
    size = (720, 480)
    streams, _ = raw_tiles(slide_factory(size=size, compression="jpeg_rgb"))
    got = cpu_variant.decode(streams, "jpeg").numpy().astype(int)
    pattern = TissuePattern(*size)
    truth = np.stack([pattern.render(240 * (i % 3), 240 * (i // 3), 240, 240) for i in range(len(streams))])
    assert np.abs(got - truth).mean() < 3.0
    assert np.abs(got.mean(axis=(0, 1, 2)) - truth.mean(axis=(0, 1, 2))).max() < 2.0


def test_cpu_variant_outputs_outlive_later_batches(cpu_variant: GpuDecoder, slide_streams) -> None:
    """Decoders may hand out their library's buffers without a copy only if the next batch cannot reuse them."""
    first = cpu_variant.decode(slide_streams["jpeg"][:8], "jpeg")
    for _ in range(3):
        cpu_variant.decode(slide_streams["jpeg_rgb"][:8], "jpeg")
    assert max_diff(first, cpu_reference(slide_streams["jpeg"][:8])) <= 1


def test_cpu_variant_probe_passes(cpu_variant: GpuDecoder) -> None:
    assert gpu_decode.probe(cpu_variant) is None


def test_cpu_variant_reports_corrupt_tile_position(cpu_variant: GpuDecoder, slide_streams) -> None:
    streams = list(slide_streams["jpeg"][:4])
    streams[2] = streams[2][: len(streams[2]) // 2]  # truncated: no EOI
    with pytest.raises(cpu.StreamDecodeError) as info:
        cpu_variant.decode(streams, "jpeg")
    assert info.value.position == 2
    # the decoder is still usable afterwards (DALI rebuilds a pipeline an error invalidated)
    assert cpu_variant.decode(slide_streams["jpeg"][:2], "jpeg").shape[0] == 2


def test_cpu_variant_hands_other_codecs_to_the_cpu_decoder(cpu_variant: GpuDecoder, slide_factory) -> None:
    path = slide_factory(size=(500, 300), compression="lzw")
    with open_slide(path, backend="tiff") as slide:
        layout = slide.tile_layout(0)
        streams = slide.read_raw_tiles(0, [0, 1])
        truth = np.stack(slide.read_tiles(0, [0, 1]))
    got = cpu_variant.decode(streams, "lzw", shape=(layout.tile_height, layout.tile_width, 3))
    assert torch.equal(got, torch.from_numpy(truth))


def test_dali_gpu_pipeline_graph_is_valid() -> None:
    """The "mixed" graph cannot be built without a GPU, but DALI checks operator arguments when the
    graph is defined, so a misspelt GPU-only option fails here rather than on the device."""
    pytest.importorskip("nvidia.dali", reason=PLUGINS["dali"][1])
    from gpfm_engine.decode.dali import _import_dali, define_pipeline

    pipe = define_pipeline(_import_dali(), batch_size=4, num_threads=1, device_id=0, hw_decoder_load=0.9,
                           fancy_upsampling=True)
    assert pipe is not None


# --- selection, fallbacks, errors (no library needed) ---------------------------------------------


class _CpuBacked(GpuDecoder):
    """A stand-in plug-in that decodes on the CPU, optionally with a colour bug or a failure."""

    name = "fake"
    package = "fake-package"
    swap_channels = False
    fail = False

    def _decode_batch(self, streams):
        if self.fail:
            raise RuntimeError("library refused the batch")
        tiles = torch.from_numpy(np.stack(cpu.decode(streams, "jpeg")))
        return tiles.flip(-1) if self.swap_channels else tiles


class _Missing(_CpuBacked):
    def __init__(self, device):
        raise MissingExtraError("fake-package", "gpu", "fake decoding")


class _WrongColours(_CpuBacked):
    swap_channels = True


class _Refuses(_CpuBacked):
    fail = True


@pytest.fixture
def fake_registry(monkeypatch):
    classes = {"missing": _Missing, "wrong": _WrongColours, "good": _CpuBacked, "refuses": _Refuses}
    monkeypatch.setattr(gpu_decode, "GPU_DECODERS", {k: f"{__name__}:{v.__name__}" for k, v in classes.items()})
    return classes


def test_auto_picks_first_plugin_that_imports_and_decodes_right(fake_registry, monkeypatch) -> None:
    decoder = create_gpu_decoder("auto", "cpu")
    assert type(decoder) is _CpuBacked  # "missing" cannot import, "wrong" fails the colour probe


def test_auto_explains_every_plugin_it_passed_over(fake_registry, monkeypatch) -> None:
    monkeypatch.setattr(gpu_decode, "GPU_DECODERS", {k: gpu_decode.GPU_DECODERS[k] for k in ("missing", "wrong", "refuses")})
    with pytest.raises(GpfmError) as info:
        create_gpu_decoder("auto", "cpu")
    text = str(info.value)
    assert "missing: fake decoding needs the 'fake-package' package: pip install 'gpfm-engine[gpu]'" in text
    assert "wrong: YCbCr probe tile differs from the CPU decoder" in text
    assert "refuses: probe failed: RuntimeError: library refused the batch" in text


def test_unknown_decoder_name() -> None:
    with pytest.raises(GpfmError, match="unknown GPU decoder 'nvdec'.*nvimgcodec, dali, nvjpeg"):
        create_gpu_decoder("nvdec", "cpu")


def test_refused_batch_falls_back_to_cpu_decoder(slide_streams, caplog) -> None:
    streams = slide_streams["jpeg"][:3]
    with caplog.at_level(logging.WARNING, logger="gpfm_engine.decode.gpu"):
        got = _Refuses("cpu").decode(streams, "jpeg")
    assert torch.equal(got, torch.from_numpy(cpu_reference(streams)))
    assert "fake decoder refused a batch of 3 jpeg tiles (library refused the batch)" in caplog.text


class _FakeSlide:
    """The two Slide methods decode_slide_tiles uses, over given streams (b"" = a missing tile)."""

    path = "fake.svs"

    def __init__(self, streams: list[bytes], shape: tuple[int, int]) -> None:
        from gpfm_engine.slide import TileLayout

        self.streams = streams
        self.layout = TileLayout(shape[1], shape[0], len(streams), 1, "jpeg")

    def tile_layout(self, level: int):
        return self.layout

    def read_raw_tiles(self, level: int, indices):
        return [self.streams[i] for i in indices]


def test_decode_slide_tiles_whitens_missing_tiles_and_names_corrupt_ones(slide_streams) -> None:
    good = slide_streams["jpeg"][:3]
    ref = cpu_reference(good)
    slide = _FakeSlide([good[0], b"", good[1], good[2][:100]], ref.shape[1:3])
    got = gpu_decode.decode_slide_tiles(_CpuBacked("cpu"), slide, 0, [2, 1, 0])
    assert torch.equal(got[0], torch.from_numpy(ref[1])) and torch.equal(got[2], torch.from_numpy(ref[0]))
    assert int(got[1].min()) == 255
    from gpfm_engine.errors import TileDecodeError

    with pytest.raises(TileDecodeError, match=r"fake.svs: level 0 tile 3: JPEG stream truncated"):
        gpu_decode.decode_slide_tiles(_CpuBacked("cpu"), slide, 0, [1, 0, 3])


def test_empty_batch_and_empty_stream() -> None:
    assert _CpuBacked("cpu").decode([], "jpeg").shape == (0, 0, 0, 3)
    with pytest.raises(cpu.StreamDecodeError, match="stream 1: empty stream"):
        _CpuBacked("cpu").decode([gpu_decode.probe_streams()[0][0], b""], "jpeg")


@pytest.mark.parametrize("name, module, package", [
    ("dali", "nvidia.dali", "nvidia-dali-cuda130"),
    ("nvimgcodec", "nvidia.nvimgcodec", "nvidia-nvimgcodec-cu13"),
])
def test_missing_library_names_the_gpu_extra(monkeypatch, name: str, module: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    cls = gpu_decode.decoder_class(name)
    with pytest.raises(MissingExtraError) as info:
        cls("cpu")
    assert str(info.value).endswith(f"needs the '{package}' package: pip install 'gpfm-engine[gpu]'")


def test_missing_torchvision_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    from gpfm_engine.decode.nvjpeg import _torchvision_io

    with pytest.raises(MissingExtraError, match=re.escape(f"torchvision built for torch {torch.__version__}")):
        _torchvision_io()


def test_nvjpeg_needs_cuda() -> None:
    cls = gpu_decode.decoder_class("nvjpeg")
    with pytest.raises(GpfmError):
        cls("cpu")


def test_probe_streams_mark_rgb_coding() -> None:
    """The RGB probe carries what the reader's Aperio fix writes: APP14 transform 0, ids R,G,B."""
    from gpfm_engine.slide.jpeg import iter_segments

    ycbcr, rgb = gpu_decode.probe_streams()[0]
    segments = {m: rgb[s:e] for m, s, e in iter_segments(rgb)}
    assert segments[0xEE][4:9] == b"Adobe" and segments[0xEE][-1] == 0  # transform 0: not YCbCr
    assert segments[0xC0][10:19:3] == b"RGB"
    assert b"JFIF" in ycbcr[:20]


# --- the stream glue on CPU --------------------------------------------------------------------


def test_stream_glue_on_cpu() -> None:
    tiles = [np.full((4, 5, 3), i, np.uint8) for i in range(3)]
    up = cuda_stream.upload_tiles(tiles, "cpu")
    assert up.shape == (3, 4, 5, 3) and int(up[2, 0, 0, 0]) == 2
    assert cuda_stream.upload_tiles([], "cpu").shape == (0, 0, 0, 3)
    with pytest.raises(GpfmError, match="differ in shape"):
        cuda_stream.upload_tiles([tiles[0], np.zeros((2, 2, 3), np.uint8)], "cpu")
    assert cuda_stream.to_host_async(up).wait() is up
    assert cuda_stream.upload(up, "cpu") is up
    assert cuda_stream.stream_handle("cpu") == -1
    with cuda_stream.on_engine_stream("cpu") as s:
        assert s is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_resolve_device_without_cuda() -> None:
    assert cuda_stream.resolve_device("auto") == torch.device("cpu")
    assert cuda_stream.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(GpfmError, match="sees no CUDA device"):
        cuda_stream.resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_gpu_decoder_on_machine_without_cuda() -> None:
    from gpfm_engine.decode import create_gpu_decoder as from_package

    with pytest.raises(GpfmError, match="sees no CUDA device"):
        from_package("auto", "cuda")
