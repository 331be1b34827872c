"""Resumable checkpoints: everything that makes step k+1 identical to an uninterrupted run.

A checkpoint holds the meta-architecture state (student, teacher, heads, loss centres), the
optimizer and gradient-scaler state, the next iteration, the data position (global samples
consumed), every rank's RNG states, and the resolved config. Written by rank 0 to a temporary
name and renamed, so a crash never leaves a half file; the newest ``keep`` are kept.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from gpfm_engine.errors import GpfmError

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(GpfmError):
    """A checkpoint is missing, unreadable or does not match the run."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first."""
    d = checkpoint_dir(output_dir)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt_*.pt") if (m := _NAME.match(p.name))] if d.is_dir() else []
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: Path, payload: dict, keep: int) -> Path:
    """Write ``payload`` as ``ckpt_<iteration>.pt`` atomically; prune to the newest ``keep``."""
    d = checkpoint_dir(output_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"ckpt_{payload['iteration']:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file: one line naming it
        raise CheckpointError(f"{path}: cannot read checkpoint: {type(exc).__name__}: {exc}") from exc
