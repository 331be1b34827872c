"""iBOT block masking (BEiT's ``MaskingGenerator`` as used by DINOv2) and the batch mask policy.

A mask is grown from random rectangles (area >= ``min_num_patches``, log-uniform aspect ratio)
until the requested number of patches is masked. In a batch, a fraction ``mask_probability`` of
the global crops gets masks with ratios spread evenly over ``mask_ratio_min_max`` (DINOv2
``collate_data_and_cast``); the rest are unmasked. Randomness comes from the caller's
``random.Random`` so masks are a pure function of the batch seed.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch


class MaskingGenerator:
    def __init__(self, grid: tuple[int, int], max_num_patches: int | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches if max_num_patches is not None else self.num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_mask_patches: int, rng: random.Random) -> int:
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask


def batch_masks(n_images: int, grid: tuple[int, int], mask_probability: float,
                mask_ratio_min_max: tuple[float, float], rng: random.Random) -> torch.Tensor:
    """``[n_images, h*w]`` bool masks for the stacked global crops of a batch (shuffled order)."""
    n_tokens = grid[0] * grid[1]
    generator = MaskingGenerator(grid, max_num_patches=int(0.5 * n_tokens))
    n_masked = int(n_images * mask_probability)
    bounds = np.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1)
    masks = [generator(int(n_tokens * rng.uniform(bounds[i], bounds[i + 1])), rng) for i in range(n_masked)]
    masks += [np.zeros(grid, dtype=bool) for _ in range(n_images - n_masked)]
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks).reshape(n_images, n_tokens))
