"""The PyTorch baselines, written the way users write feature extraction today.

(a) ``clam_style``: CLAM's ``extract_features_fp.py`` shape. A ``Dataset`` whose ``__getitem__``
    calls OpenSlide ``read_region`` for one patch, ``.convert("RGB")``, then the transform (PIL
    resize, ToTensor, Normalize); a torch ``DataLoader`` with worker processes batches them; the
    eager model runs under ``inference_mode`` in the main process.
(b) ``trident_style``: batched region reads. For each batch, the patches are read (OpenSlide
    releases the GIL) and transformed on a thread pool, stacked, and fed to the same model.

Both read ``read_size`` px at ``level`` at the engine's level-0 coordinates, so the pixels that
reach the model are those the engine gathers, and run the same model at the same precision (on
``device``: batches are copied there, from pinned memory in the CLAM-style loader, as CLAM does). The
thread budget is shared: ``num_workers`` / pool size = the engine's thread count, and the torch
intra-op threads are set to the same number by the caller.

torchvision is not installable beside torch 2.13.0 CPU here, so ``pil_transform`` is
``Resize((s, s), bicubic)`` + ``ToTensor`` + ``Normalize`` written out in PIL and plain torch with
torchvision's math (PIL resize on the image; /255 then (x - mean) / std in float32).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import openslide
import torch
from PIL import Image

Transform = Callable[[Image.Image], torch.Tensor]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class PilTransform:
    """torchvision ``Compose([Resize((s, s), interp), ToTensor(), Normalize(mean, std)])``, same math.

    A class rather than a closure so DataLoader workers can pickle it under any start method.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic") -> None:
        self.size = size
        self.resample = _RESAMPLE[interpolation]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.size, self.size), self.resample)
        t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous().float().div(255)
        return (t - self.mean) / self.std


def pil_transform(cfg) -> PilTransform:
    """The users' transform for a model cfg (input size, interpolation, mean and std from the cfg)."""
    return PilTransform(cfg.input_size, cfg.mean, cfg.std, getattr(cfg, "interpolation", "bicubic"))


class OpenSlidePatches(torch.utils.data.Dataset):
    """CLAM's ``Whole_Slide_Bag_FP``: one OpenSlide ``read_region`` per patch, then the transform.

    The handle is opened lazily in each worker (sharing one forked libtiff handle between worker
    processes races on the file offset).
    """

    def __init__(self, path: str, coords: np.ndarray, level: int, read_size: int, transform: Transform) -> None:
        self.path, self.coords, self.level, self.read_size, self.transform = str(path), coords, level, read_size, transform
        self._slide: openslide.OpenSlide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = openslide.OpenSlide(self.path)
        x, y = (int(v) for v in self.coords[i])
        img = self._slide.read_region((x, y), self.level, (self.read_size, self.read_size)).convert("RGB")
        return self.transform(img)


class TimedModel:
    """Calls ``model`` and adds the seconds spent in it to ``seconds`` (the model's share of a run)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.seconds = model, 0.0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.model(batch).float()
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - t0
        return out


@torch.inference_mode()
def clam_style(path, coords: np.ndarray, level: int, read_size: int, model: torch.nn.Module, transform: Transform,
               batch_size: int = 64, num_workers: int = 2, device: str = "cpu") -> torch.Tensor:
    """Baseline (a): DataLoader workers doing per-patch ``read_region`` + PIL transforms; eager model."""
    loader = torch.utils.data.DataLoader(OpenSlidePatches(path, coords, level, read_size, transform),
                                         batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device != "cpu", persistent_workers=False)
    out = [model(batch.to(device, non_blocking=True)).float() for batch in loader]
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def trident_style(path, coords: np.ndarray, level: int, read_size: int, model: torch.nn.Module,
                  transform: Transform, batch_size: int = 64, threads: int = 2, device: str = "cpu") -> torch.Tensor:
    """Baseline (b): per batch, regions read and transformed on a thread pool, then the eager model."""
    out = []
    with openslide.OpenSlide(str(path)) as slide, ThreadPoolExecutor(threads) as pool:

        def load(xy: np.ndarray) -> torch.Tensor:
            img = slide.read_region((int(xy[0]), int(xy[1])), level, (read_size, read_size)).convert("RGB")
            return transform(img)

        for start in range(0, len(coords), batch_size):
            batch = torch.stack(list(pool.map(load, coords[start : start + batch_size])))
            out.append(model(batch.to(device)).float())
    return torch.cat(out) if out else torch.empty(0)
