"""Training data: tile sources, multi-crop augmentation, masks, and the sharded resumable stream."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.augment import MultiCropAugmentation, random_resized_crop
from training.data.masking import batch_masks
from training.data.sources import ImageFolderSource, SlideSource, TileCatalog
from training.data.stream import MultiCropCollate, ShardedSampleOrder, build_loader

AUG = MultiCropAugmentation(56, 28, 3, (0.32, 1.0), (0.05, 0.32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def catalog(slide_factory, tmp_path_factory) -> TileCatalog:
    folder = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    slide = SlideSource(slide_factory(size=(1024, 1024), mpp=0.5, seed=3), fov_um=64.0, tile_px=96, overlap=0.5)
    return TileCatalog([slide, ImageFolderSource(folder)])


def test_sources_give_tiles_of_the_requested_size(catalog: TileCatalog) -> None:
    slide, folder = catalog.sources
    assert len(slide) > 10 and slide.read_size == 128 and slide.read(0).size == (96, 96)
    assert len(folder) == 5 and folder.read(2).size == (50, 42)
    assert catalog.read(len(slide)).size == folder.read(0).size
    assert np.asarray(slide.read(0)).std() > 5  # tissue, not blank glass


def test_multicrop_shapes_and_determinism() -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    a, b = AUG(img, random.Random(7)), AUG(img, random.Random(7))
    assert [t.shape for t in a["global_crops"]] == [(3, 56, 56)] * 2 and [t.shape for t in a["local_crops"]] == [(3, 28, 28)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]))
    assert not torch.equal(a["global_crops"][0], AUG(img, random.Random(8))["global_crops"][0])


def test_random_resized_crop_falls_back_to_a_centre_crop() -> None:
    img = Image.new("RGB", (400, 10), (10, 20, 30))  # no crop of the scale range fits the ratio range
    assert random_resized_crop(img, 16, (0.9, 1.0), random.Random(0)).size == (16, 16)


def test_batch_masks_follow_the_probability_and_ratio() -> None:
    masks = batch_masks(8, (8, 8), 0.5, (0.1, 0.5), random.Random(0))
    counts = masks.sum(1)
    assert masks.shape == (8, 64) and int((counts > 0).sum()) == 4 and int(counts.max()) <= 32


def test_sample_order_shards_ranks_and_resumes() -> None:
    def take(rank: int, world: int, start: int, n: int) -> list[tuple[int, int]]:
        it = iter(ShardedSampleOrder(10, seed=3, rank=rank, world=world, start=start))
        return [next(it) for _ in range(n)]

    r0, r1 = take(0, 2, 0, 10), take(1, 2, 0, 10)
    assert sorted(g for g, _ in r0 + r1) == list(range(20))
    assert sorted(i for g, i in r0 + r1 if g < 10) == list(range(10))  # epoch 0 is a permutation
    assert take(0, 2, 6, 7) == r0[3:]                                   # resume from a global position
    assert take(0, 1, 0, 20) != take(0, 1, 10, 20)                       # epochs are reshuffled


def test_batches_do_not_depend_on_worker_count(catalog: TileCatalog) -> None:
    collate = MultiCropCollate((4, 4), 0.5, (0.1, 0.5), seed=0)

    def batches(workers: int) -> list[dict]:
        loader = build_loader(catalog, AUG, collate, 3, seed=0, rank=0, world=1, start=6, num_workers=workers)
        return [b for _, b in zip(range(3), loader)]

    for a, b in zip(batches(0), batches(2)):
        assert all(torch.equal(a[k], b[k]) for k in ("global_crops", "local_crops", "masks", "first_sample"))
