"""Fidelity: the engine's features equal the textbook computation, patch by patch.

The reference is written without any of the engine's code (no gpfm_engine reader, kernel or
backend): OpenSlide ``read_region`` of the patch's field of view at the read level the engine
recorded, composited on white, PIL bicubic resize to the model input, normalization with the
model cfg's mean/std, and the same network (``load_model``) in torch fp32. The only engine facts it
uses are the documented geometry of a patch (``gpfm_engine.gather``): a ``P x P`` source square,
``P = floor(patch_size_read + 0.5)``, whose top-left at the read level is
``floor(coord / downsample + 0.5)``.

For at least 32 random kept patches of every slide (all of them when a slide has fewer), of every
real slide in ../shared/data that OpenSlide opens and of synthesized slides covering level-0 and
level > 0 reads, Aperio RGB JPEG tiles and an odd µm/px, the cosine similarity of the engine's CPU
fp32 feature and the reference must be >= 0.9999.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from PIL import Image

from _pipeline_utils import tiny_weights  # noqa: F401 - fixture
from gpfm_engine import Engine
from gpfm_engine.errors import SlideError
from gpfm_engine.models import load_model
from gpfm_engine.pipeline import stream_slide

SAMPLES = 32
MIN_COSINE = 0.9999

# name -> (write_slide arguments, engine geometry). A 64 µm field of view keeps the slides small
# while giving >= 32 kept patches, and puts the 80x slide's read at level 1 (0.25 µm/px, downsample 2).
SYNTHESIZED = {
    "svs-jpeg-level0": (dict(size=(2500, 2200), mpp=0.5, seed=51, coverage=0.95), {}),
    "tiff-aperio-rgb-0.263": (dict(size=(2000, 2000), mpp=0.263, fmt="tiff", compression="jpeg_rgb", seed=52,
                                   coverage=0.95), dict(fov_um=64.0)),
    "svs-80x-read-level1": (dict(size=(3600, 3600), mpp=0.125, downsample=2, seed=53, coverage=0.95),
                            dict(fov_um=64.0)),
}


def make_engine(weights: Path, **geometry) -> Engine:
    return Engine(model="gpfm-tiny", weights=weights, device="cpu", precision="fp32", batch_size=16, **geometry)


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> Engine:
    return make_engine(tiny_weights)


@pytest.fixture(scope="module")
def model(tiny_weights: Path) -> torch.nn.Module:
    return load_model("gpfm-tiny", weights=tiny_weights, device="cpu").eval()


def reference_features(path: Path, coords: np.ndarray, level: int, downsample: float, patch_size_read: float,
                       model: torch.nn.Module) -> torch.Tensor:
    """OpenSlide read_region -> white composite -> PIL bicubic resize -> normalize -> model fp32."""
    cfg = model.cfg
    size = math.floor(patch_size_read + 0.5)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    images = []
    with openslide.OpenSlide(str(path)) as osl:
        os_downsample = osl.level_downsamples[level]
        for x, y in coords.tolist():
            ox, oy = math.floor(x / downsample + 0.5), math.floor(y / downsample + 0.5)
            location = (round(ox * os_downsample), round(oy * os_downsample))
            region = osl.read_region(location, level, (size, size))
            white = Image.new("RGBA", region.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, region).convert("RGB")
            images.append(np.asarray(rgb.resize((cfg.input_size, cfg.input_size), Image.Resampling.BICUBIC)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return model((x - mean) / std)


def check_slide(engine: Engine, model: torch.nn.Module, path: Path, seed: int = 0) -> int:
    """Compare engine and reference on up to SAMPLES random kept patches; returns how many."""
    with engine.open(path) as slide:
        plan = engine.plan(slide)
        if plan.num_patches == 0:
            return 0
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(plan.num_patches, size=min(SAMPLES, plan.num_patches), replace=False))
        grid = dataclasses.replace(plan.grid, coords=plan.grid.coords[pick],
                                   tissue_fraction=plan.grid.tissue_fraction[pick])
        plan = dataclasses.replace(plan, grid=grid)
        batches = list(stream_slide(engine, plan))
    coords = np.concatenate([b.coords for b in batches])
    ours = torch.cat([b.features for b in batches])
    np.testing.assert_array_equal(coords, grid.coords)
    ref = reference_features(path, coords, int(grid.read_level), plan.downsample, float(grid.patch_size_read), model)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    worst = int(cos.argmin())
    assert cos.min().item() >= MIN_COSINE, (
        f"{path.name}: patch at {coords[worst].tolist()} (level {grid.read_level}) cosine {cos[worst].item():.6f}")
    return len(coords)


@pytest.mark.parametrize("name", sorted(SYNTHESIZED))
def test_fidelity_synthesized(name: str, slide_factory, tiny_weights: Path, model: torch.nn.Module) -> None:
    slide_kwargs, geometry = SYNTHESIZED[name]
    engine = make_engine(tiny_weights, **geometry)
    assert check_slide(engine, model, slide_factory(**slide_kwargs)) == SAMPLES


def openslide_slides(root: Path) -> list[Path]:
    """Files under ``root/wsi`` that OpenSlide opens (one per DICOM series folder)."""
    found, series = [], set()
    for p in sorted((root / "wsi").rglob("*")):
        if not p.is_file() or (p.suffix.lower() in (".dcm", ".dicom") and p.parent in series):
            continue
        try:
            openslide.OpenSlide(str(p)).close()
        except openslide.OpenSlideError:
            continue
        if p.suffix.lower() in (".dcm", ".dicom"):
            series.add(p.parent)
        found.append(p)
    return found


@pytest.mark.realdata
def test_fidelity_real_slides(shared_data: Path, engine: Engine, model: torch.nn.Module) -> None:
    checked, skipped = {}, {}
    for path in openslide_slides(shared_data):
        try:
            n = check_slide(engine, model, path)
        except SlideError as exc:  # no trustworthy mpp, or pixels OpenSlide cannot read either
            skipped[path.name] = str(exc)
            continue
        (checked if n else skipped)[path.name] = n or "no patch with tissue"
    # the real slides with tissue at a known scale must all have been compared
    assert {"CMU-1-Small-Region.svs", "test3-DAPI-2-(387).ndpi"} <= set(checked), (checked, skipped)
    assert all(n == SAMPLES for n in checked.values()), checked
