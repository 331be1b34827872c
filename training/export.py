"""``python -m training.export CKPT --out FILE.safetensors``: the EMA teacher's backbone as a
weights file that ``gpfm_engine.load_model(name, weights=FILE)`` loads strictly, plus a recipe
JSON beside it (``FILE.json``: model, architecture, sha256, iteration, data, config, git sha and
the last logged losses), so a shipped file says exactly how it was made.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from gpfm_engine.errors import GpfmError
from training.checkpoint import load_checkpoint
from training.config import git_sha
from training.entry import run_entry_point

log = logging.getLogger("training.export")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEACHER_PREFIX = "teacher.backbone."


def teacher_backbone_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """``teacher.backbone.*`` of a training checkpoint, prefix removed (the engine's flat names)."""
    state = {k[len(TEACHER_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(TEACHER_PREFIX)}
    if not state:
        raise GpfmError("checkpoint has no teacher backbone (keys 'teacher.backbone.*')")
    return state


def _last_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def _wall_seconds(run_dir: Path) -> float | None:
    """First to last logged row of metrics.jsonl (rows carry ``time``; resumed runs include the pause)."""
    path = run_dir / "metrics.jsonl"
    times = [json.loads(ln).get("time") for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    times = [t for t in times if t is not None]
    return round(times[-1] - times[0], 1) if len(times) > 1 else None


def _run_info(run_dir: Path) -> dict | None:
    path = run_dir / "run_info.json"
    return json.loads(path.read_text()) if path.is_file() else None


def export(ckpt_path: Path, out: Path, dtype: str = "fp32") -> dict:
    """Write the weights file and its recipe; returns the recipe."""
    from gpfm_engine.models import get_model_cfg, sha256_file
    from gpfm_engine.models.weights import load_state_dict_strict

    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    model_cfg = get_model_cfg(cfg["model"]["name"])
    state = teacher_backbone_state(ckpt)
    # Prove the file fits the architecture before writing it: the same strict check load_model does.
    load_state_dict_strict(model_cfg.build(**cfg["model"]["arch"]), state, str(ckpt_path), model_cfg.optional_keys)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    # One metadata key only: safetensors writes the metadata map in hash order, so more keys would
    # make two exports of the same tensors differ in bytes (and in sha256). The recipe says the rest.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)  # safetensors writes owner-only; a packaged file must be readable by all
    tmp.replace(out)
    run_dir = ckpt_path.resolve().parent.parent
    recipe = {
        "model": model_cfg.name, "arch": dict(model_cfg.arch), "training_arch_overrides": cfg["model"]["arch"],
        "weights_file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size, "dtype": dtype,
        "source_checkpoint": str(ckpt_path), "iteration": ckpt["iteration"], "samples_seen": ckpt["data_position"],
        "what": "EMA teacher backbone of a self-distillation run of training/ (python -m training.train)",
        "run": _run_info(run_dir), "last_logged_losses": _last_metrics(run_dir), "wall_seconds": _wall_seconds(run_dir),
        "export_git_sha": git_sha(), "config": cfg,
    }
    out.with_suffix(".json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file (recipe goes to .json beside it)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage dtype of the weights")
    args = p.parse_args(argv)
    recipe = export(args.checkpoint, args.out, args.dtype)
    log.info("wrote %s (%d bytes, sha256 %s) and %s", args.out, recipe["bytes"], recipe["sha256"], args.out.with_suffix(".json"))


if __name__ == "__main__":
    run_entry_point(main, log)
