"""The streaming pipeline and the Python API: same features however the work is cut up, corrupt
tiles skipped (or fatal), tiles of any size embedded like patches, threads always cleaned up."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _pipeline_utils import SMALL, corrupt_tile, tile_of, tiny_weights  # noqa: F401 - fixture
from gpfm_engine import Engine, SlideEmbedding, open_slide
from gpfm_engine.errors import TileDecodeError
from gpfm_engine.pipeline import PipelineOptions, stream_slide


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> Engine:
    return Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=8, workers=2)


@pytest.fixture(scope="module")
def slide_path(slide_factory) -> Path:
    return slide_factory(**SMALL, seed=3)


@pytest.fixture(scope="module")
def embedding(engine: Engine, slide_path: Path) -> SlideEmbedding:
    return engine.embed_slide(slide_path)


def reference(engine: Engine, patches: np.ndarray) -> torch.Tensor:
    """The model on PIL-resized, normalized patches ([N, H, W, 3] uint8), computed here by hand."""
    cfg = engine.cfg
    size = cfg.input_size
    x = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC)) for p in patches])
    t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) \
        / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return engine.backend.model(t)


def test_embed_slide(engine: Engine, slide_path: Path, embedding: SlideEmbedding) -> None:
    assert len(embedding) > 8  # more than one batch
    assert embedding.features.shape == (len(embedding), 192) and embedding.features.dtype == torch.float32
    assert embedding.features.device == engine.device
    assert embedding.coords.dtype == np.int64
    with open_slide(slide_path) as s:
        plan = engine.plan(s)
        np.testing.assert_array_equal(embedding.coords, plan.grid.coords)
    meta = embedding.meta
    assert meta["read_level"] == 0 and meta["patch_size_level0"] == 256 and meta["tiles_skipped"] == 0
    assert meta["weights_sha256"] == engine.weights_sha256 and meta["precision"] == "fp32"
    # the first patch against the model on the same pixels, resized by PIL
    with open_slide(slide_path) as s:
        x, y = embedding.coords[0]
        patch = s.read_region((int(x), int(y)), 0, (256, 256))
    ref = reference(engine, patch[None])
    assert torch.nn.functional.cosine_similarity(ref, embedding.features[:1]).item() > 0.9999


def test_same_features_however_the_work_is_cut(engine: Engine, slide_path: Path, embedding: SlideEmbedding) -> None:
    streamed = list(engine.iter_batches(slide_path))
    assert [len(c) for c, _ in streamed][:-1] == [8] * (len(streamed) - 1)
    torch.testing.assert_close(torch.cat([f for _, f in streamed]), embedding.features)
    np.testing.assert_array_equal(np.concatenate([c for c, _ in streamed]), embedding.coords)
    # a tile budget of a few tiles forces every batch to be gathered in many small groups
    with open_slide(slide_path) as s:
        plan = engine.plan(s)
        tiny_budget = PipelineOptions(tile_budget_bytes=240 * 240 * 3 * 4, batches_in_flight=1)
        small = torch.cat([b.features for b in stream_slide(engine, plan, options=tiny_budget)])
    torch.testing.assert_close(small, embedding.features)


def test_corrupt_tile_skipped_or_fatal(engine: Engine, slide_factory, tiny_weights: Path) -> None:
    path = slide_factory(name="corrupt", **SMALL, seed=3)
    with open_slide(path) as s:
        plan = engine.plan(s)
        columns = s.tile_layout(0).columns
    bad = int(tile_of(plan.grid.coords[len(plan.grid.coords) // 2:][:1], 240, columns)[0])
    corrupt_tile(path, tile=bad)
    emb = engine.embed_slide(path)
    assert emb.meta["tiles_skipped"] == 1
    assert 0 < len(emb) < plan.num_patches
    # every dropped patch overlaps the corrupt tile; every kept one keeps its exact features
    dropped = {tuple(c) for c in plan.grid.coords.tolist()} - {tuple(c) for c in emb.coords.tolist()}
    tx, ty = (bad % columns) * 240, (bad // columns) * 240
    assert all(x < tx + 240 + 3 and x + 256 + 3 > tx and y < ty + 240 + 3 and y + 256 + 3 > ty for x, y in dropped)
    strict = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=8, workers=2, on_tile_error="fail")
    with pytest.raises(TileDecodeError, match=f"level 0 tile {bad}"):
        strict.embed_slide(path)


def test_embed_tiles_inputs(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    tiles224 = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    tiles256 = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    f224 = engine.embed_tiles(tiles224)
    torch.testing.assert_close(f224, reference(engine, tiles224), rtol=1e-4, atol=1e-4)
    f256 = engine.embed_tiles(torch.from_numpy(tiles256))
    torch.testing.assert_close(f256, reference(engine, tiles256), rtol=1e-4, atol=1e-4)
    # a mixed list (PIL and arrays, two sizes) comes back in the input's order
    mixed = engine.embed_tiles([Image.fromarray(tiles256[0]), tiles224[1], tiles256[1]])
    torch.testing.assert_close(mixed, torch.stack([f256[0], f224[1], f256[1]]), rtol=1e-5, atol=1e-5)
    rgba = Image.fromarray(np.dstack([tiles224[0], np.full((224, 224), 255, np.uint8)]), "RGBA")
    torch.testing.assert_close(engine.embed_tiles(rgba), f224[:1], rtol=1e-5, atol=1e-5)


def test_no_patches_and_early_stop_leave_no_threads(engine: Engine, slide_factory, slide_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    empty = engine.embed_slide(slide_factory(**SMALL, coverage=0.0))
    assert empty.features.shape == (0, 192) and empty.coords.shape == (0, 2)
    for _coords, _feats in engine.iter_batches(slide_path):
        break  # the consumer walks away after one batch
    leftover = [t.name for t in threading.enumerate() if t.name not in before and t.name.startswith("gpfm")]
    assert not leftover


def test_heartbeat_keeps_held_locks_fresh(tmp_path: Path) -> None:
    """Locks of slides waiting in the prefetch queue must not look stale to other hosts."""
    import os
    import time

    from gpfm_engine import locks
    from gpfm_engine.pipeline import _Heartbeat

    held, done = locks.try_lock(tmp_path / "a.lock"), locks.try_lock(tmp_path / "b.lock")
    old = time.time() - locks.STALE_AFTER_S - 1
    os.utime(held.path, (old, old))
    beat = _Heartbeat(every_s=0.02)
    try:
        beat.hold(held)
        beat.hold(done)
        done.release()
        deadline = time.monotonic() + 10
        while locks.is_stale(held.path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not locks.is_stale(held.path)
        assert not done.path.exists()  # a released lock is never touched (or recreated)
    finally:
        beat.close()
        held.release()
