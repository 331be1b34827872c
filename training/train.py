"""``python -m training.train --config NAME [key=value ...]``: the training loop as plain functions.

The loop reads in order (DINOv2 habit): schedules -> forward_backward -> clip -> step -> EMA ->
log -> checkpoint. Launch one process, or ``torchrun --nproc_per_node=N -m training.train ...``.
A run resumes from the newest checkpoint in its output folder unless ``--no-resume`` is given.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from gpfm_engine.errors import GpfmError
from training import distributed
from training.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import apply_scaling_rules, load_config, save_run_info
from training.data.augment import MultiCropAugmentation
from training.data.sources import TileCatalog, build_catalog
from training.data.stream import MultiCropCollate, build_loader
from training.experts import build_experts
from training.meta_arch import DistillMetaArch
from training.schedules import Schedules, build_schedules
from training.entry import run_entry_point

log = logging.getLogger("training")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="experiment config: a name in training/configs or a path")
    p.add_argument("--output-dir", default=None, help="shortcut for train.output_dir=...")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")
    return p.parse_args(argv)


def select_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: dict, params_groups: list[dict]) -> torch.optim.AdamW:
    """AdamW over parameter groups fused by (lr multiplier, wd multiplier, last-layer flag)."""
    fused: dict[tuple, dict] = {}
    for g in params_groups:
        key = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        fused.setdefault(key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1], "is_last_layer": key[2]})
        fused[key]["params"].append(g["params"])
    opt = cfg["optim"]
    return torch.optim.AdamW(list(fused.values()), lr=opt["lr"], betas=(opt["adamw_beta1"], opt["adamw_beta2"]))


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    for g in optimizer.param_groups:
        g["weight_decay"] = values["wd"] * g["wd_multiplier"]
        g["lr"] = (values["last_layer_lr"] if g["is_last_layer"] else values["lr"]) * g["lr_multiplier"]


def build_data(cfg: dict, patch_size: int, rank: int, world: int, start: int, output_dir: Path,
               mean_std: tuple) -> tuple[Iterable, TileCatalog]:
    crops, ibot, train = cfg["crops"], cfg["ibot"], cfg["train"]
    # Rank 0 builds the catalog first (it may synthesize slides into the cache); the others follow.
    if not distributed.is_main():
        distributed.barrier()
    catalog = build_catalog(cfg["data"], output_dir / "cache")
    if distributed.is_main():
        distributed.barrier()
    augment = MultiCropAugmentation(
        crops["global_crops_size"], crops["local_crops_size"], crops["local_crops_number"],
        tuple(crops["global_crops_scale"]), tuple(crops["local_crops_scale"]), *mean_std,
        jitter=tuple(crops["color_jitter"]), jitter_prob=crops["color_jitter_prob"], grayscale_prob=crops["grayscale_prob"],
        solarize_prob=crops["solarize_prob"])
    grid = crops["global_crops_size"] // patch_size
    collate = MultiCropCollate((grid, grid), ibot["mask_sample_probability"], tuple(ibot["mask_ratio_min_max"]), train["seed"])
    loader = build_loader(catalog, augment, collate, train["batch_size_per_gpu"], train["seed"], rank, world, start,
                          train["num_workers"])
    return loader, catalog


def make_checkpoint(model: DistillMetaArch, optimizer: torch.optim.Optimizer, scaler, iteration: int, cfg: dict) -> dict:
    """Collective: every rank must call it (FSDP gathers shards, RNG states are gathered)."""
    return {"model": distributed.model_state_dict(model), "optimizer": distributed.optimizer_state_dict(model, optimizer),
            "scaler": scaler.state_dict() if scaler is not None else None, "iteration": iteration,
            "data_position": iteration * cfg["train"]["global_batch_size"], "rng": distributed.gather_objects(rng_state()),
            "config": cfg}


def restore(model: DistillMetaArch, optimizer: torch.optim.Optimizer, scaler, ckpt: dict, cfg: dict, rank: int) -> int:
    """Load a checkpoint into the run; returns the iteration to continue from."""
    if ckpt["config"]["train"]["global_batch_size"] != cfg["train"]["global_batch_size"]:
        raise GpfmError(f"checkpoint was written with global batch {ckpt['config']['train']['global_batch_size']}, "
                        f"this run has {cfg['train']['global_batch_size']}: the data position would not match")
    distributed.load_model_state_dict(model, ckpt["model"])
    distributed.load_optimizer_state_dict(model, optimizer, ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][rank])
    return int(ckpt["iteration"])


class MetricsLog:
    """Per-iteration loss terms (kept in memory for the caller) and ``metrics.jsonl`` on rank 0."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.history: list[dict[str, float]] = []

    def record(self, iteration: int, local: dict[str, torch.Tensor], extra: dict[str, float], write: bool) -> None:
        self.history.append({"iteration": iteration, **{k: float(v) for k, v in local.items()}})
        if not write:
            return
        row = {"iteration": iteration, "time": round(time.time(), 3), **distributed.all_reduce_mean(local), **extra}
        if self.path is None:  # not rank 0: it took part in the all-reduce, rank 0 reports
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("it %d  %s", iteration, "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("iteration", "time")))


def do_train(cfg: dict, model: DistillMetaArch, optimizer, scaler, schedules: Schedules, loader: Iterable,
             start_iter: int, output_dir: Path) -> MetricsLog:
    train = cfg["train"]
    total = len(schedules.lr)
    stop = total if train["stop_at_iteration"] is None else min(total, train["stop_at_iteration"])
    metrics = MetricsLog(output_dir / "metrics.jsonl" if distributed.is_main() else None)
    model.train()
    t_last = time.perf_counter()
    for it, batch in zip(range(start_iter, stop), loader):
        values = schedules.at(it)
        apply_optim_scheduler(optimizer, values)
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(batch, values["teacher_temp"], scaler)
        if not math.isfinite(float(losses["total"])):
            raise GpfmError(f"{output_dir}: loss is not finite at iteration {it}: "
                            + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norms = model.clip_gradients(cfg["optim"]["clip_grad"])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.update_teacher(values["mom"])
        write = (it + 1) % train["log_period"] == 0 or it + 1 == stop
        now = time.perf_counter()
        extra = values | {f"grad_norm/{k}": v for k, v in grad_norms.items()} | {"sec_per_it": now - t_last}
        t_last = now
        metrics.record(it, losses, extra, write)
        if (it + 1) % train["checkpoint_period"] == 0 or it + 1 == stop:
            payload = make_checkpoint(model, optimizer, scaler, it + 1, cfg)
            if distributed.is_main():
                save_checkpoint(output_dir, payload, train["keep_checkpoints"])
            distributed.barrier()
    return metrics


def init_from_pretrained(model: DistillMetaArch, path: str) -> None:
    """Student and teacher backbones from one weights file (any layout the engine's loader reads)."""
    from gpfm_engine.models import get_model_cfg
    from gpfm_engine.models.weights import load_weights

    cfg = get_model_cfg(model.cfg["model"]["name"])
    load_weights(model.student.backbone, cfg, path)
    model.teacher.backbone.load_state_dict(model.student.backbone.state_dict())


@dataclass
class RunResult:
    """What a run leaves in memory: its per-iteration losses and the trained meta-architecture."""

    metrics: MetricsLog
    model: DistillMetaArch


def main(argv: Sequence[str] | None = None) -> RunResult:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.output_dir={args.output_dir}"] if args.output_dir else [])
    raw_cfg = load_config(args.config, overrides)
    owns_group = not torch.distributed.is_initialized()
    rank, world, local_rank = distributed.init_distributed(raw_cfg["distributed"]["backend"])
    try:
        return _run(apply_scaling_rules(raw_cfg, world), rank, world, local_rank, args.no_resume)
    finally:
        if owns_group:
            distributed.destroy()


def _run(cfg: dict, rank: int, world: int, local_rank: int, no_resume: bool) -> RunResult:
    compute, train = cfg["compute"], cfg["train"]
    output_dir = Path(train["output_dir"])
    if compute["threads"]:
        torch.set_num_threads(compute["threads"])
    torch.use_deterministic_algorithms(compute["deterministic"])
    seed_everything(train["seed"])  # identical initial weights on every rank (FSDP shards them as they are)
    device = select_device(compute["device"], local_rank)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute["precision"])
    from gpfm_engine.models import get_model_cfg

    model_cfg = get_model_cfg(cfg["model"]["name"])
    experts = build_experts(cfg["experts"], (model_cfg.mean, model_cfg.std), device, None)
    model = DistillMetaArch(cfg, experts).to(device)
    if cfg["model"]["pretrained"]:
        init_from_pretrained(model, cfg["model"]["pretrained"])
    model.prepare_for_distributed_training(cfg["distributed"]["strategy"])
    seed_everything(train["seed"] + rank)  # per-rank randomness from here on (drop-path)
    optimizer = build_optimizer(cfg, model.get_params_groups())
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    schedules = build_schedules(cfg)
    checkpoints = [] if no_resume else list_checkpoints(output_dir)
    start_iter = restore(model, optimizer, scaler, load_checkpoint(checkpoints[-1]), cfg, rank) if checkpoints else 0
    loader, catalog = build_data(cfg, model.student.backbone.patch_size, rank, world,
                                 start_iter * train["global_batch_size"], output_dir, (model_cfg.mean, model_cfg.std))
    if distributed.is_main():
        save_run_info(cfg, output_dir, {"world_size": world, "device": str(device), "data": catalog.summary(),
                                        "resumed_from": str(checkpoints[-1]) if checkpoints else None})
        log.info("run %s: %d tiles, %d iterations from %d, global batch %d, lr %.3g", output_dir, len(catalog),
                 len(schedules.lr), start_iter, train["global_batch_size"], cfg["optim"]["lr"])
    return RunResult(do_train(cfg, model, optimizer, scaler, schedules, loader, start_iter, output_dir), model)


if __name__ == "__main__":
    run_entry_point(main, log)
