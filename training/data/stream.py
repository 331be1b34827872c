"""A deterministic, sharded, resumable sample stream.

Global sample ``g`` (0, 1, 2, ... over the whole run) is tile ``perm_e[g mod n]`` of epoch
``e = g // n``, where ``perm_e`` is a permutation seeded by (seed, e). Rank ``r`` of ``world`` takes
the samples with ``g mod world == r``; DataLoader workers only compute items, so the batch
contents do not depend on the worker count. Every random choice for sample ``g`` (crops, jitter)
and for a batch (masks) is seeded from (seed, g), so resuming needs one number: the global
position, ``iteration * global_batch``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.data.augment import MultiCropAugmentation
from training.data.masking import batch_masks
from training.data.sources import TileCatalog


def sample_seed(seed: int, g: int, stream: int = 0) -> int:
    """A 64-bit seed for one sample (``stream`` separates independent uses of the same sample)."""
    return int(np.random.SeedSequence([seed, g, stream]).generate_state(2, np.uint32).view(np.uint64)[0])


class ShardedSampleOrder(Sampler):
    """Infinite stream of ``(g, tile_index)`` for one rank, starting at global position ``start``."""

    def __init__(self, n_items: int, seed: int, rank: int, world: int, start: int = 0) -> None:
        self.n, self.seed, self.rank, self.world, self.start = n_items, seed, rank, world, start
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def item(self, g: int) -> int:
        epoch = g // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._perm[g % self.n])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.start + self.rank
        while True:
            yield g, self.item(g)
            g += self.world


class MultiCropDataset(Dataset):
    """Maps ``(g, tile_index)`` to the crops of that tile, seeded by ``g``."""

    def __init__(self, catalog: TileCatalog, augment: MultiCropAugmentation, seed: int) -> None:
        self.catalog, self.augment, self.seed = catalog, augment, seed

    def __len__(self) -> int:
        return len(self.catalog)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        g, index = key
        crops = self.augment(self.catalog.read(index), random.Random(sample_seed(self.seed, g)))
        return {"g": g, **crops}


@dataclass(frozen=True)
class MultiCropCollate:
    """Stacks crops crop-major (all samples' crop 0, then crop 1, ...) and draws iBOT masks."""

    patch_grid: tuple[int, int]
    mask_probability: float
    mask_ratio_min_max: tuple[float, float]
    seed: int

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        global_crops = torch.stack([s["global_crops"][i] for i in range(len(samples[0]["global_crops"])) for s in samples])
        n_local = len(samples[0]["local_crops"])
        local_crops = (torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples]) if n_local else None)
        rng = random.Random(sample_seed(self.seed, samples[0]["g"], stream=1))
        masks = batch_masks(len(global_crops), self.patch_grid, self.mask_probability, self.mask_ratio_min_max, rng)
        return {"global_crops": global_crops, "local_crops": local_crops, "masks": masks,
                "first_sample": torch.tensor(samples[0]["g"])}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_loader(catalog: TileCatalog, augment: MultiCropAugmentation, collate: MultiCropCollate, batch_size: int,
                 seed: int, rank: int, world: int, start: int, num_workers: int) -> DataLoader:
    """A DataLoader over the stream from global position ``start``; it never touches the global RNG."""
    order = ShardedSampleOrder(len(catalog), seed, rank, world, start)
    return DataLoader(MultiCropDataset(catalog, augment, seed), batch_size=batch_size, sampler=order,
                      num_workers=num_workers, collate_fn=collate, drop_last=True,
                      worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers else None,
                      generator=torch.Generator().manual_seed(seed))
