"""Schedules as precomputed arrays (DINOv2 habit): the loop indexes them by iteration, so resuming
only needs the iteration number and no scheduler object carries hidden state."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup_value: float = 0.0, freeze_iters: int = 0) -> np.ndarray:
    """``total_iters`` values: zeros while frozen, linear warm-up, then half-cosine to ``final_value``."""
    if total_iters <= 0:
        raise ValueError(f"schedule length must be positive, got {total_iters}")
    freeze_iters = min(freeze_iters, total_iters)
    warmup_iters = min(warmup_iters, total_iters - freeze_iters)
    freeze = np.zeros(freeze_iters)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
    n_cos = total_iters - warmup_iters - freeze_iters
    steps = np.arange(n_cos)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cos, 1)))
    return np.concatenate((freeze, warmup, cosine)).astype(np.float64)


def linear_then_constant(start_value: float, end_value: float, total_iters: int, ramp_iters: int) -> np.ndarray:
    """Linear ramp from ``start_value`` to ``end_value`` over ``ramp_iters``, then flat (teacher temperature)."""
    ramp_iters = min(ramp_iters, total_iters)
    ramp = np.linspace(start_value, end_value, ramp_iters, endpoint=False)
    return np.concatenate((ramp, np.full(total_iters - ramp_iters, end_value))).astype(np.float64)


@dataclass(frozen=True)
class Schedules:
    """Every per-iteration hyper-parameter of a run."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    def at(self, it: int) -> dict[str, float]:
        return {"lr": float(self.lr[it]), "wd": float(self.wd[it]), "mom": float(self.momentum[it]),
                "teacher_temp": float(self.teacher_temp[it]), "last_layer_lr": float(self.last_layer_lr[it])}


def build_schedules(cfg: dict) -> Schedules:
    """All schedules from the resolved config; lengths are in iterations (epochs x epoch_length)."""
    opt, tea, train = cfg["optim"], cfg["teacher"], cfg["train"]
    ep = train["epoch_length"]
    total = opt["epochs"] * ep
    lr = cosine_schedule(opt["lr"], opt["min_lr"], total, warmup_iters=round(opt["warmup_epochs"] * ep))
    wd = cosine_schedule(opt["weight_decay"], opt["weight_decay_end"], total)
    momentum = cosine_schedule(tea["momentum_teacher"], tea["final_momentum_teacher"], total)
    teacher_temp = linear_then_constant(tea["warmup_teacher_temp"], tea["teacher_temp"], total,
                                        round(tea["warmup_teacher_temp_epochs"] * ep))
    freeze = round(opt["freeze_last_layer_epochs"] * ep)
    last_layer_lr = lr.copy()
    last_layer_lr[:freeze] = 0.0
    return Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, last_layer_lr=last_layer_lr)
