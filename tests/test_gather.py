"""The gather kernel against the reference path: white-composited crop -> PIL BICUBIC -> normalize.

Tolerances: the resampled uint8 image is identical to PIL's ``Image.resize((S, S), BICUBIC)`` of
the same crop (checked by inverting the normalization, which is exact at float32 precision since
one grey level is ~0.017 in normalized units), and the float32 output is within 1e-6 of the
float64 normalization of PIL's image (one float32 multiply-add). float16 / bfloat16 outputs are
bit-identical to rounding the float32 output (one round-to-nearest-even from the same float).
Inputs are random uint8 and synthesized tissue, never constant images.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gpfm_engine import _core, synth
from gpfm_engine.gather import WHITE_LEVEL, PatchGather, read_size, resample_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
S = 224


@dataclass
class Level:
    """One pyramid level cut into stored tiles (edge tiles padded with white, as read_tiles does)."""

    image: np.ndarray
    tile_w: int
    tile_h: int

    @property
    def layout(self) -> SimpleNamespace:
        h, w = self.image.shape[:2]
        return SimpleNamespace(tile_width=self.tile_w, tile_height=self.tile_h, columns=-(-w // self.tile_w),
                               rows=-(-h // self.tile_h), compression="none")

    def tiles(self, indices: np.ndarray) -> list[np.ndarray]:
        lay = self.layout
        out = []
        for i in indices:
            r, c = divmod(int(i), lay.columns)
            tile = np.full((self.tile_h, self.tile_w, 3), 255, np.uint8)
            part = self.image[r * self.tile_h:(r + 1) * self.tile_h, c * self.tile_w:(c + 1) * self.tile_w]
            tile[:part.shape[0], :part.shape[1]] = part
            tile.setflags(write=False)  # like the tile cache's arrays
            out.append(tile)
        return out

    def crop(self, x: int, y: int, size: int) -> np.ndarray:
        """read_region's answer: the size x size region at (x, y), white outside the image."""
        h, w = self.image.shape[:2]
        out = np.full((size, size, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.image[y0:y1, x0:x1]
        return out


def pil_resized(patch: np.ndarray, size: int = S) -> np.ndarray:
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))


_MEAN64 = torch.tensor(MEAN, dtype=torch.double)[:, None, None]
_STD64 = torch.tensor(STD, dtype=torch.double)[:, None, None]


def normalized(u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).double() / 255.0
    return (x - _MEAN64) / _STD64


def as_uint8(out: torch.Tensor) -> np.ndarray:
    """Undo the normalization: the resampled uint8 image the kernel computed."""
    x = out.double() * _STD64 + _MEAN64
    return torch.round(x * 255).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def gather(level: Level, coords: np.ndarray, size: int, dtype=torch.float32, out_size: int = S, ds: float = 1.0):
    g = PatchGather(level.layout, 0, size, out_size, MEAN, STD, dtype)
    plan = g.plan(coords, ds)
    out, bg = g.empty_batch(len(coords)), torch.empty(len(coords))
    g.run(level.tiles(plan.tile_indices), plan, out, bg)
    return out, bg, plan


def check_against_pil(level: Level, coords: np.ndarray, size: int, out_size: int = S) -> torch.Tensor:
    out, bg, _ = gather(level, coords, size, out_size=out_size)
    ref = np.stack([pil_resized(level.crop(int(x), int(y), size), out_size) for x, y in coords])
    got = as_uint8(out)
    diff = np.abs(got.astype(int) - ref)
    assert np.array_equal(got, ref), f"{np.count_nonzero(diff)} values differ from PIL (max {diff.max()})"
    torch.testing.assert_close(out.double(), normalized(ref), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(bg.numpy(), (ref >= WHITE_LEVEL).all(-1).mean((1, 2)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def random_level() -> Level:
    rng = np.random.default_rng(7)
    return Level(rng.integers(0, 256, (1250, 1400, 3), dtype=np.uint8), tile_w=240, tile_h=256)


@pytest.fixture(scope="module")
def tissue_level() -> Level:
    image = synth.TissuePattern(2400, 2000, mpp=0.5, seed=3, coverage=0.6).render(300, 300, 1200, 900)
    assert image.std() > 10  # tissue and glass, not a flat image
    return Level(image, tile_w=256, tile_h=256)


def edge_coords(level: Level, size: int, rng: np.random.Generator) -> np.ndarray:
    """Patches inside, across tile seams, and across every image edge (partly outside: white)."""
    h, w = level.image.shape[:2]
    inside = np.stack([rng.integers(0, max(w - size, 1), 2), rng.integers(0, max(h - size, 1), 2)], axis=1)
    return np.concatenate([inside, [[-size // 3, -size // 5], [w - size // 2, h - size // 4],
                                    [w - 10, 17], [level.tile_w - 7, level.tile_h - 3]]])


@pytest.mark.parametrize("size", [512, 561, 224, 200, 1024])
def test_random_data_matches_pil(random_level: Level, size: int) -> None:
    check_against_pil(random_level, edge_coords(random_level, size, np.random.default_rng(size)), size)


@pytest.mark.parametrize("size", [512, 561])
def test_tissue_matches_pil(tissue_level: Level, size: int) -> None:
    rng = np.random.default_rng(size)
    h, w = tissue_level.image.shape[:2]
    coords = np.stack([rng.integers(-50, w - size + 50, 5), rng.integers(-50, h - size + 50, 5)], axis=1)
    check_against_pil(tissue_level, coords, size)


@pytest.mark.parametrize("out_size", [100, 37])
def test_other_output_sizes_match_pil(random_level: Level, out_size: int) -> None:
    """Sizes that are not a multiple of the SIMD width exercise the scalar tails."""
    check_against_pil(random_level, np.array([[13, 250], [900, 700]]), 300, out_size=out_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_round_the_float32_result(random_level: Level, dtype: torch.dtype) -> None:
    coords = edge_coords(random_level, 512, np.random.default_rng(1))
    out32, _, _ = gather(random_level, coords, 512)
    out, _, _ = gather(random_level, coords, 512, dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, out32.to(dtype))


def test_tile_list_and_stacks_agree(random_level: Level) -> None:
    coords = edge_coords(random_level, 561, np.random.default_rng(2))
    g = PatchGather(random_level.layout, 0, 561, S, MEAN, STD)
    plan = g.plan(coords, 1.0)
    tiles = random_level.tiles(plan.tile_indices)
    results = []
    for form in (tiles, np.stack(tiles), torch.from_numpy(np.stack(tiles))):
        out = torch.full((len(coords), 3, S, S), float("nan"))
        results.append(g.run(form, plan, out))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_thread_counts_agree(random_level: Level) -> None:
    coords = edge_coords(random_level, 512, np.random.default_rng(3))
    before = _core.num_threads()
    try:
        _core.set_num_threads(1)
        one, _, _ = gather(random_level, coords, 512)
        _core.set_num_threads(3)
        three, _, _ = gather(random_level, coords, 512)
    finally:
        _core.set_num_threads(before)
    assert torch.equal(one, three)


def test_portable_loops_match_simd(random_level: Level, tmp_path) -> None:
    """GPFM_SIMD=portable selects the plain C++ loops (what non-x86 builds run): same bytes."""
    coords = np.array([[5, 9], [800, 600], [-40, 1100]])
    np.save(tmp_path / "image.npy", random_level.image)
    script = f"""
import numpy as np, torch, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_gather import Level, gather
level = Level(np.load({str(tmp_path / 'image.npy')!r}), 240, 256)
out, bg, _ = gather(level, np.array({coords.tolist()!r}), 561)
torch.save((out, bg), {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, GPFM_SIMD="portable")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    portable, portable_bg = torch.load(tmp_path / "out.pt")
    out, bg, _ = gather(random_level, coords, 561)
    assert torch.equal(out, portable) and torch.equal(bg, portable_bg)


def test_rectangular_images_match_pil() -> None:
    rng = np.random.default_rng(4)
    for h, w in [(200, 300), (400, 224), (224, 224)]:
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        out = resample_images(images, S, MEAN, STD)
        ref = np.stack([pil_resized(im) for im in images])
        assert np.array_equal(as_uint8(out), ref), (h, w)


def test_plan_geometry() -> None:
    level = Level(np.zeros((1000, 900, 3), np.uint8), tile_w=240, tile_h=256)
    g = PatchGather(level.layout, 1, 255.9999, S, MEAN, STD)
    assert g.src_size == 256 and read_size(561.4) == 561 and read_size(200.5) == 201
    coords = np.array([[0, 0], [4000, 4001], [-1000, 3000], [4 * 899, 0]])
    plan = g.plan(coords, 4.000121)
    # read-level origin = floor(coord / downsample + 0.5)
    np.testing.assert_array_equal(plan.read_origins, [[0, 0], [1000, 1000], [-250, 750], [899, 0]])
    assert np.all(np.diff(plan.tile_indices) > 0)
    assert plan.lut.dtype == np.int32 and plan.lut.shape == (4, 2, 3)  # 256 px span <= 2 rows of 256, 3 columns of 240
    lay = level.layout
    for i, (x, y) in enumerate(plan.read_origins):
        fx, fy = plan.origins[i]
        c0, r0 = (x - fx) // lay.tile_width, (y - fy) // lay.tile_height
        for r in range(plan.lut.shape[1]):
            for c in range(plan.lut.shape[2]):
                row, col = r0 + r, c0 + c
                entry = plan.lut[i, r, c]
                if 0 <= row < lay.rows and 0 <= col < lay.columns:
                    assert plan.tile_indices[entry] == row * lay.columns + col
                else:
                    assert entry == -1


def test_read_level_origins_match_the_level_crop(random_level: Level) -> None:
    """At a level above 0 the source is the level's own pixels at the rounded origin."""
    ds = 4.000121
    coords = np.array([[0, 0], [2 * 4001, 3999], [4 * 1300, 4 * 1100]])
    out, _, plan = gather(random_level, coords, 300, ds=ds)
    ref = np.stack([pil_resized(random_level.crop(int(x), int(y), 300)) for x, y in plan.read_origins])
    assert np.array_equal(as_uint8(out), ref)


def test_all_white_when_outside(random_level: Level) -> None:
    out, bg, plan = gather(random_level, np.array([[-5000, -5000], [10**6, 10]]), 512)
    assert len(plan.tile_indices) == 0
    assert np.all(as_uint8(out) == 255) and torch.all(bg == 1.0)


def test_bad_arguments_are_clear_errors(random_level: Level) -> None:
    g = PatchGather(random_level.layout, 0, 512, S, MEAN, STD)
    plan = g.plan(np.array([[10, 10]]), 1.0)
    tiles = random_level.tiles(plan.tile_indices)
    with pytest.raises(ValueError, match="tiles for a plan"):
        g.run(tiles[:-1], plan, g.empty_batch(1))
    with pytest.raises(ValueError, match=r"\[N, 3, S, S\]"):
        g.run(tiles, plan, torch.empty(1, 3, S, S + 1))
    with pytest.raises(ValueError, match="RGB tiles"):
        g.run([t[:, :, :2] for t in tiles], plan, g.empty_batch(1))
    bad = np.where(plan.lut >= 0, plan.lut + 100, -1).astype(np.int32)
    with pytest.raises(ValueError, match="not a tile index"):
        _core.gather(tiles, bad, plan.rects, g.empty_batch(1), 256, 240, 512, 512, list(MEAN), list(STD))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        PatchGather(random_level.layout, 0, 512, S, MEAN, STD, torch.int32)
