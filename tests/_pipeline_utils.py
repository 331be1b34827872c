"""Helpers shared by the pipeline, CLI and fidelity tests: a small model with random (non-trivial)
weights, small synthesized slides, and a way to corrupt one stored tile of a slide."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from _model_utils import randomize

MODEL = "gpfm-tiny"


def write_random_weights(path: Path, name: str = MODEL, seed: int = 0) -> Path:
    """Weights of a registered model with values that matter (see ``_model_utils.randomize``)."""
    from safetensors.torch import save_file

    from gpfm_engine.models import build_model

    model = randomize(build_model(name), seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpfm-tiny's architecture with random weights: tests of the pipeline do not need a trained model."""
    return write_random_weights(tmp_path_factory.mktemp("weights") / "gpfm-tiny-random.safetensors")


# Small slides: at 0.5 µm/px a 128 µm patch is 256 px, so a 1500 x 1100 slide has about 17 patches
# (more than two batches of 8) and a TINY one about 8.
SMALL = dict(size=(1500, 1100), mpp=0.5, tile=240)
TINY = dict(size=(1000, 780), mpp=0.5, tile=240, coverage=0.7)


def corrupt_tile(path: Path, level_page: int = 0, tile: int = 0) -> None:
    """Overwrite one stored tile's bytes with zeros (no JPEG marker left: any decoder must refuse)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level_page]
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)


def tile_of(coords: np.ndarray, tile_size: int, columns: int) -> np.ndarray:
    """Index of the stored level-0 tile holding each coordinate (for picking a tile to corrupt)."""
    return (coords[:, 1] // tile_size) * columns + coords[:, 0] // tile_size
