"""Which model the end-to-end and memory benchmarks run, so engine and baselines run the same one.

gpfm-tiny with its shipped weights when they exist. Before the training issue ships them, the
same registered architecture with seeded random weights, saved once to the benchmark cache and
passed to both sides as ``weights=`` (speed does not depend on the weight values; the output says
which case it was).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import data

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpfm-tiny"


@dataclass(frozen=True)
class ModelChoice:
    """A registered model name, the weights file to pass (``None`` = shipped), and a one-line note."""

    name: str
    weights: Path | None
    note: str


def choose(name: str = DEFAULT_MODEL) -> ModelChoice:
    """The shipped weights of ``name`` if they load, else seeded random weights for its architecture."""
    from gpfm_engine.errors import WeightsError
    from gpfm_engine.models import load_model

    try:
        load_model(name, device="cpu")
        return ModelChoice(name, None, f"{name}, shipped weights")
    except WeightsError as exc:
        log.info("shipped weights of %s not usable (%s); using random weights", name, exc)
    path = data.cache_dir() / f"{name}-random-seed0.safetensors"
    if not path.exists():
        _write_random_weights(name, path)
    return ModelChoice(name, path, f"{name} architecture with random weights (shipped weights absent)")


def _write_random_weights(name: str, path: Path) -> None:
    from safetensors.torch import save_file

    from gpfm_engine.models import build_model

    torch.manual_seed(0)
    model = build_model(name)
    tmp = path.with_name(path.name + ".tmp.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def load(choice: ModelChoice, device: str = "cpu") -> torch.nn.Module:
    """The eager model the baselines run (fp32, eval mode): the same weights the engine loads."""
    from gpfm_engine.models import load_model

    model = load_model(choice.name, weights=None if choice.weights is None else str(choice.weights), device=device)
    return model.eval()
