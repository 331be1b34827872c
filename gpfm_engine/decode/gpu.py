"""GPU tile decoders: the common behaviour of the plug-ins and the choice among them.

Every plug-in (``dali.py``, ``nvimgcodec.py``, ``nvjpeg.py``) takes the self-contained streams that
``Slide.read_raw_tiles`` returns (JPEGTables spliced in, Aperio RGB tiles already marked as RGB)
and returns ONE uint8 tensor ``[T, h, w, 3]`` on its device, made on the engine stream
(:mod:`gpfm_engine.cuda_stream`) so the gather kernel and the backend can follow without a host
synchronisation. What a plug-in cannot take — another compression, or a batch its library
rejects (nvJPEG refuses some valid JPEGs) — is decoded by the CPU decoder and uploaded from pinned
memory; corrupt tiles are therefore always reported by the CPU decoder, one error per tile.

``create_gpu_decoder("auto")`` picks the first plug-in in :data:`GPU_DECODERS` that imports, starts,
and decodes a probe (a YCbCr and an RGB-coded tile) like the CPU decoder.
"""
from __future__ import annotations

import abc
import importlib
import logging
import threading
from typing import ClassVar, Sequence

import numpy as np
import torch

from gpfm_engine.cuda_stream import on_engine_stream, to_device, upload_tiles
from gpfm_engine.errors import GpfmError, MissingExtraError, exception_summary

log = logging.getLogger(__name__)

#: Plug-in name → "module:class", in the order ``auto`` tries them. nvImageCodec first: it is the
#: library the other two wrap (DALI ≥ 2.2 decodes through it; torchvision calls nvJPEG directly),
#: with the least per-batch machinery. ``benchmarks/gpu_check.py`` measures all of them.
GPU_DECODERS: dict[str, str] = {
    "nvimgcodec": "gpfm_engine.decode.nvimgcodec:NvImageCodecDecoder",
    "dali": "gpfm_engine.decode.dali:DaliDecoder",
    "nvjpeg": "gpfm_engine.decode.nvjpeg:TorchvisionNvjpegDecoder",
}

#: Largest difference from the CPU decoder a probe tile may show. GPU IDCTs and chroma upsampling
#: differ from libjpeg-turbo by a few levels; a colour-space mistake (Aperio RGB read as YCbCr)
#: shows as tens to hundreds.
PROBE_TOLERANCE = 12


def cpu_decode(streams: Sequence[bytes], compression: str, **options) -> list[np.ndarray]:
    """The reference CPU decoder (``gpfm_engine.decode.cpu.decode``; ``options``: shape, predictor)."""
    from gpfm_engine.decode import cpu

    return cpu.decode(streams, compression, **options)


def check_jpeg_streams(streams: Sequence[bytes]) -> None:
    """Refuse corrupt JPEG streams before a GPU library sees them, with the CPU decoder's own check.

    GPU decoders, like libjpeg-turbo, may turn a truncated scan into grey filler without an error;
    garbage must never come back as pixels, and the error must name the stream's position.
    """
    from gpfm_engine.decode.cpu import StreamDecodeError, _check_jpeg

    for position, stream in enumerate(streams):
        if not stream:
            raise StreamDecodeError(position, "empty stream")
        try:
            _check_jpeg(stream)
        except StreamDecodeError as exc:
            raise StreamDecodeError(position, exc.cause) from None


class GpuDecoder(abc.ABC):
    """One GPU decode library behind ``decode(streams, compression) -> uint8 [T, h, w, 3] tensor``.

    Subclasses set ``name``, ``package`` (what ``pip`` installs) and ``compressions`` and implement
    :meth:`_decode_batch`, which must enqueue its work on torch's current stream (the engine stream
    while it runs) and may raise on any batch it cannot decode.
    """

    name: ClassVar[str]
    package: ClassVar[str]
    compressions: ClassVar[frozenset[str]] = frozenset({"jpeg"})

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._lock = threading.Lock()  # the libraries' decoder states are not thread-safe

    @abc.abstractmethod
    def _decode_batch(self, streams: Sequence[bytes]) -> torch.Tensor:
        """Decode same-sized tiles into ``[T, h, w, 3]`` uint8 on ``self.device``."""

    def decode(self, streams: Sequence[bytes], compression: str, **cpu_options) -> torch.Tensor:
        """Decode a batch of tile streams of one compression into one tensor on ``self.device``.

        Raises ``StreamDecodeError`` (with the stream's position) exactly where the CPU decoder
        would; ``cpu_options`` (shape, predictor) are for compressions decoded on the CPU.
        """
        if not streams:
            return torch.empty((0, 0, 0, 3), dtype=torch.uint8, device=self.device)
        with on_engine_stream(self.device):
            if compression in self.compressions:
                if compression == "jpeg":
                    check_jpeg_streams(streams)
                try:
                    with self._lock:
                        return self._decode_batch(streams)
                except Exception as exc:  # noqa: BLE001 - any library refusal falls back to the CPU decoder
                    log.warning("%s decoder refused a batch of %d %s tiles (%s); decoding it on the CPU",
                                self.name, len(streams), compression, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return upload_tiles(cpu_decode(streams, compression, **cpu_options), self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


def decode_slide_tiles(decoder: GpuDecoder, slide, level: int, indices: Sequence[int]) -> torch.Tensor:
    """Stored tiles ``indices`` of a slide level, read raw and decoded by ``decoder``: one uint8
    ``[T, th, tw, 3]`` tensor on the decoder's device, in order, missing tiles white (as
    ``Slide.read_tiles`` gives them).

    For levels whose ``tile_layout(level).compression`` is in ``decoder.compressions``; a corrupt
    tile raises ``TileDecodeError`` naming the file, level and tile index.
    """
    from gpfm_engine.decode.cpu import StreamDecodeError
    from gpfm_engine.errors import TileDecodeError

    indices = [int(i) for i in indices]
    layout = slide.tile_layout(level)
    streams = slide.read_raw_tiles(level, indices)
    present = [k for k, stream in enumerate(streams) if stream]
    try:
        tiles = decoder.decode([streams[k] for k in present], layout.compression)
    except StreamDecodeError as exc:
        raise TileDecodeError(slide.path, level, indices[present[exc.position]], exc.cause) from None
    if len(present) == len(streams):
        return tiles
    with on_engine_stream(decoder.device):
        out = torch.full((len(streams), layout.tile_height, layout.tile_width, 3), 255, dtype=torch.uint8,
                         device=decoder.device)
        if present:
            out.index_copy_(0, to_device(np.asarray(present, np.int64), decoder.device), tiles)
    return out


def stack_tiles(tiles: Sequence[torch.Tensor]) -> torch.Tensor:
    """One ``[T, h, w, 3]`` tensor from per-tile ``[h, w, 3]`` tensors (one device copy)."""
    shapes = {tuple(t.shape) for t in tiles}
    if len(shapes) != 1:
        raise GpfmError(f"tiles of one batch differ in shape: {sorted(shapes)}")
    return torch.stack(list(tiles))


def decoder_class(name: str) -> type[GpuDecoder]:
    """The plug-in class registered under ``name`` (imports only our module, not its library)."""
    if name not in GPU_DECODERS:
        raise GpfmError(f"unknown GPU decoder {name!r}; choose one of {', '.join(GPU_DECODERS)} or 'auto'")
    module, cls = GPU_DECODERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def probe_streams() -> tuple[list[bytes], list[np.ndarray]]:
    """Two small probe tiles as streams like ``read_raw_tiles`` returns: YCbCr 4:2:0 and RGB-coded.

    The RGB one carries the Adobe APP14 transform=0 marker and R,G,B component ids, exactly what
    the reader's Aperio fix produces, so a decoder that ignores them fails the probe.
    Returns the streams and the pixels they encode.
    """
    import imagecodecs

    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 11.0),
                      128 + 90 * np.sin((xx + yy) / 13.0)], axis=-1).round().astype(np.uint8)
    ycbcr = imagecodecs.jpeg8_encode(image, level=95, colorspace="RGB", outcolorspace="YCBCR", subsampling="420")
    rgb = imagecodecs.jpeg8_encode(image, level=95, colorspace="RGB", outcolorspace="RGB")
    return [bytes(ycbcr), bytes(rgb)], [image, image]


def probe(decoder: GpuDecoder) -> str | None:
    """Decode the probe tiles; ``None`` when they match the CPU decoder, else why not (one line)."""
    streams, _ = probe_streams()
    try:
        for stream, label in zip(streams, ("YCbCr", "RGB")):
            got = decoder._decode_batch([stream])
            ref = cpu_decode([stream], "jpeg")[0]
            diff = int(np.abs(got[0].cpu().numpy().astype(np.int16) - ref.astype(np.int16)).max())
            if diff > PROBE_TOLERANCE:
                return f"{label} probe tile differs from the CPU decoder by {diff} grey levels"
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run means "does not work here"
        return f"probe failed: {exception_summary(exc)}"
    return None


def create_gpu_decoder(name: str = "auto", device: torch.device | str = "cuda", **options) -> GpuDecoder:
    """Build the named plug-in, or with ``"auto"`` the first in :data:`GPU_DECODERS` that works here.

    ``auto`` raises a :class:`GpfmError` listing why each plug-in was passed over; callers that
    can run on the CPU decoder alone catch it and log it.
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise GpfmError(f"GPU tile decoding on {device}: torch {torch.__version__} sees no CUDA device")
    if name != "auto":
        return decoder_class(name)(device, **options)
    reasons = []
    for candidate in GPU_DECODERS:
        try:
            decoder = decoder_class(candidate)(device, **options)
        except MissingExtraError as exc:
            reasons.append(f"{candidate}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - a library that imports but cannot start here
            reasons.append(f"{candidate}: {exception_summary(exc)}")
            continue
        with on_engine_stream(decoder.device):
            why = probe(decoder)
        if why is None:
            log.info("GPU tile decoder: %s on %s", candidate, decoder.device)
            return decoder
        reasons.append(f"{candidate}: {why}")
    raise GpfmError("no GPU tile decoder works here (" + "; ".join(reasons) + ")")
