"""Tile decoders behind one interface: ``decode(streams, compression) -> list of [h, w, 3] uint8``.

``cpu`` (this package's default, imagecodecs) always works; GPU decoders live beside it as
plug-ins (``dali``, ``nvjpeg``, ``nvimgcodec``) and return a torch uint8 CUDA tensor
``[T, h, w, 3]`` instead. Streams come from ``Slide.read_raw_tiles`` and are self-contained.
"""
from __future__ import annotations

from gpfm_engine.decode.cpu import COMPRESSIONS, RAW_COMPRESSIONS, StreamDecodeError, decode, decode_map, to_rgb

__all__ = ["COMPRESSIONS", "RAW_COMPRESSIONS", "StreamDecodeError", "create_gpu_decoder", "decode", "decode_map",
           "to_rgb"]


def create_gpu_decoder(name: str = "auto", device="cuda", **options):
    """A GPU decoder plug-in by name, or with ``"auto"`` the first that works here (``decode/gpu.py``).

    Imported on call: the plug-ins bring torch and CUDA glue that CPU slide reading does not need.
    """
    from gpfm_engine.decode.gpu import create_gpu_decoder as create

    return create(name, device, **options)
