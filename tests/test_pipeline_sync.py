"""No host synchronisation per batch: the per-batch code of the pipeline only enqueues device work.

On CUDA, ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(tensor)``, boolean-mask indexing (it needs
``nonzero``) and host data placed on the device with ``torch.tensor(..., device=)`` each make the
host wait for the GPU. The CPU tests run the same per-batch code (backend call, corrupt-row drop,
gather, tile fetch) under a ``TorchFunctionMode`` that records every such call, so a regression is
caught without a GPU; the CUDA test (skipped here) runs the stream under
``torch.cuda.set_sync_debug_mode("error")``. Outputs are compared with the unchanged rows of a
clean slide (exact) to show the index-based row drop keeps the right rows.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from _pipeline_utils import SMALL, corrupt_tile, tile_of, tiny_weights  # noqa: F401 - fixture
from gpfm_engine import Engine, open_slide
from gpfm_engine import pipeline
from gpfm_engine.engine import _as_uint8_batches
from gpfm_engine.pipeline import stream_slide

# Tensor methods / torch functions whose result the host must wait for on a CUDA device.
SYNCING = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                     "argwhere", "masked_select", "unique", "unique_consecutive"})
INDEXING = frozenset({"__getitem__", "__setitem__", "index_put", "index_put_"})
HOST_DATA = frozenset({"tensor", "as_tensor"})


def _has_mask(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.dtype in (torch.bool, torch.uint8)
    if isinstance(obj, (tuple, list)):
        return any(_has_mask(o) for o in obj)
    return False


class SyncSpy(TorchFunctionMode):
    """Records (thread name, call) of every torch call that would synchronise with a CUDA device."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if (name in SYNCING or (name in INDEXING and _has_mask(args[1:2]))
                or (name in HOST_DATA and "device" in kwargs)):
            self.seen.append(f"{threading.current_thread().name}: {name}")
        return func(*args, **kwargs)


@pytest.fixture
def spied_loader(monkeypatch) -> list[str]:
    """Every batch the loader thread fills runs under a spy (torch function modes are per thread)."""
    seen: list[str] = []
    fill = pipeline._BatchLoader._fill

    def spied(self, coords, buffer):
        with SyncSpy(seen):
            return fill(self, coords, buffer)

    monkeypatch.setattr(pipeline._BatchLoader, "_fill", spied)
    return seen


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> Engine:
    return Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=4, workers=2)


@pytest.fixture(scope="module")
def slides(slide_factory) -> tuple[Path, Path, int]:
    """A clean slide, the same slide with one stored tile corrupted (in a later batch), and that tile."""
    # both named: a named request replaces the factory's cached unnamed slide of the same arguments,
    # so an unnamed one may be another test's corrupted copy
    clean = slide_factory(name="sync-clean", **SMALL, seed=3)
    broken = slide_factory(name="sync-corrupt", **SMALL, seed=3)
    with open_slide(clean) as s:
        grid = Engine(model="gpfm-tiny", device="cpu").plan(s).grid
        columns = s.tile_layout(0).columns
    bad = int(tile_of(grid.coords[2 * len(grid.coords) // 3:][:1], 240, columns)[0])
    corrupt_tile(broken, tile=bad)
    return clean, broken, bad


def _stream_spied(engine: Engine, path: Path, seen: list[str]) -> tuple[np.ndarray, torch.Tensor, int]:
    """Stream a slide; every batch after the first (which also sets the slide up) runs under the spy."""
    with open_slide(path) as s:
        plan = engine.plan(s)
        batches = stream_slide(engine, plan)
        first = [next(batches)]
        with SyncSpy(seen):
            rest = list(batches)
    got = first + rest
    assert len(got) > 2
    return (np.concatenate([b.coords for b in got]), torch.cat([b.features for b in got]),
            sum(b.tiles_skipped for b in got))


def test_batches_never_wait_for_the_device(engine: Engine, slides, spied_loader: list[str]) -> None:
    clean, broken, _ = slides
    consumer: list[str] = []
    coords, feats, skipped = _stream_spied(engine, clean, consumer)
    assert skipped == 0
    assert consumer == [] and spied_loader == []


def test_corrupt_rows_dropped_by_index_without_waiting(engine: Engine, slides, spied_loader: list[str]) -> None:
    clean, broken, bad = slides
    ref_coords, ref_feats, _ = _stream_spied(engine, clean, [])
    consumer: list[str] = []
    coords, feats, skipped = _stream_spied(engine, broken, consumer)
    assert consumer == [] and spied_loader == []
    assert skipped == 1 and 0 < len(coords) < len(ref_coords)
    # the kept rows are exactly the clean slide's rows at the same coordinates, in grid order
    rows = {tuple(c): i for i, c in enumerate(ref_coords.tolist())}
    index = [rows[tuple(c)] for c in coords.tolist()]
    assert index == sorted(index)
    torch.testing.assert_close(feats, ref_feats[index], rtol=0, atol=0)


def test_embed_tiles_places_positions_without_waiting(engine: Engine) -> None:
    rng = np.random.default_rng(1)
    mixed = [rng.integers(0, 256, (224 + 32 * (i % 2),) * 2 + (3,), dtype=np.uint8) for i in range(5)]
    groups = _as_uint8_batches(mixed)  # two sizes: rows land at positions 0, 2, 4 and 1, 3
    seen: list[str] = []
    with SyncSpy(seen):
        got = pipeline.embed_images(engine, groups)
    assert seen == []
    one_by_one = torch.cat([engine.embed_tiles(image) for image in mixed])
    torch.testing.assert_close(got, one_by_one, rtol=1e-5, atol=1e-5)


def test_spy_sees_what_it_must() -> None:
    """The spy itself: the calls that synchronise on CUDA are recorded, plain device work is not."""
    seen: list[str] = []
    x = torch.arange(6.0)
    with SyncSpy(seen):
        x[x > 2]
        x.sum().item()
        torch.as_tensor(np.arange(3), device="cpu")
        x.index_select(0, torch.arange(2)) * 2
        x[1:3]
    assert [s.split(": ")[1] for s in seen] == ["__getitem__", "item", "as_tensor"]


def _cuda_engine_or_skip(weights: Path) -> Engine:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (the CPU tests above cover the logic)")
    from gpfm_engine.cuda_stream import cuda_kernels_usable

    if not cuda_kernels_usable():
        pytest.skip("gpfm_engine._core was built without CUDA launchers")
    return Engine(model="gpfm-tiny", weights=weights, device="cuda", batch_size=4, workers=2,
                  compile=False, cuda_graphs=False)


def test_cuda_stream_has_no_sync_per_batch(tiny_weights: Path, slides) -> None:
    engine = _cuda_engine_or_skip(tiny_weights)
    _, broken, _ = slides
    with open_slide(broken) as s:
        plan = engine.plan(s)
        batches = stream_slide(engine, plan)
        next(batches)
        torch.cuda.set_sync_debug_mode("error")
        try:
            rest = list(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert rest and all(b.features.is_cuda for b in rest)
