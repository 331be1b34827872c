"""DINOv2 multi-crop augmentation in plain PIL + torch (no torchvision in this environment).

Per image: 2 global crops and ``n_local`` local crops. Each crop: RandomResizedCrop (bicubic,
ratio 3/4..4/3, torchvision's sampling rule), horizontal flip p=0.5, ColorJitter p (random order
of brightness, contrast, saturation, hue, as torchvision), grayscale p; then Gaussian blur p=1.0
on global crop 1; blur p=0.1 and solarise p=0.2 (configurable) on global crop 2; blur p=0.5 on local crops
(DINOv2 ``data/augmentations.py``, unchanged in GPFM). All randomness comes from one
``random.Random`` per sample, so a crop set is a pure function of the sample seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop(img: Image.Image, size: int, scale: Sequence[float], rng: random.Random) -> Image.Image:
    """torchvision ``RandomResizedCrop.get_params`` (10 tries, then a centre crop), bicubic resize."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:
        in_ratio = width / height
        w, h = width, height
        if in_ratio < RATIO[0]:
            h = int(round(w / RATIO[0]))
        elif in_ratio > RATIO[1]:
            w = int(round(h * RATIO[1]))
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """Rotate hue by ``factor`` of a turn in HSV (torchvision's PIL rule)."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int16) + int(round(factor * 255))) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_jitter(img: Image.Image, strength: Sequence[float], rng: random.Random) -> Image.Image:
    """Brightness, contrast, saturation factors in [1-x, 1+x] and hue in [-h, h], applied in random order."""
    b, c, s, h = strength
    ops = [
        lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(max(0.0, 1 - b), 1 + b)),
        lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(max(0.0, 1 - c), 1 + c)),
        lambda im: ImageEnhance.Color(im).enhance(rng.uniform(max(0.0, 1 - s), 1 + s)),
        lambda im: adjust_hue(im, rng.uniform(-h, h)),
    ]
    for i in rng.sample(range(4), 4):
        img = ops[i](img)
    return img


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@dataclass(frozen=True)
class MultiCropAugmentation:
    global_size: int
    local_size: int
    n_local: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    solarize_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def _crop(self, img: Image.Image, size: int, scale: Sequence[float], blur_p: float, solarize_p: float,
              rng: random.Random) -> torch.Tensor:
        out = random_resized_crop(img, size, scale, rng)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_prob:
            out = color_jitter(out, self.jitter, rng)
        if rng.random() < self.grayscale_prob:
            out = out.convert("L").convert("RGB")
        if rng.random() < blur_p:
            out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_sigma)))
        if rng.random() < solarize_p:
            out = ImageOps.solarize(out, threshold=128)
        return to_tensor(out, self.mean, self.std)

    def __call__(self, img: Image.Image, rng: random.Random) -> dict[str, list[torch.Tensor]]:
        img = img.convert("RGB")
        global_crops = [self._crop(img, self.global_size, self.global_scale, 1.0, 0.0, rng),
                        self._crop(img, self.global_size, self.global_scale, 0.1, self.solarize_prob, rng)]
        local_crops = [self._crop(img, self.local_size, self.local_scale, 0.5, 0.0, rng) for _ in range(self.n_local)]
        return {"global_crops": global_crops, "local_crops": local_crops}
