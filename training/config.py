"""Layered configuration: complete defaults, then one experiment file, then CLI ``key=value`` pairs.

Every key an experiment file or override sets must exist in ``configs/default.yaml`` (typos fail
loudly), except inside maps whose default is empty (``model.arch``), which are open. Derived values
come from one named function, :func:`apply_scaling_rules`; the resolved config and the git sha are
written next to the outputs by :func:`save_run_info`.
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path
from typing import Any, Sequence

import yaml

from gpfm_engine.errors import GpfmError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(GpfmError):
    """A config file or override is malformed or names a key that does not exist."""


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def resolve_config_path(name: str | Path) -> Path:
    """A path, or the stem of a file in ``training/configs`` (``smoke`` -> ``configs/smoke.yaml``)."""
    p = Path(name)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"{name}: no such config file (nor {candidate})")


def open_maps(defaults: dict, where: str = "") -> set[str]:
    """Dotted paths of the maps that are empty in the defaults: any key may be added under them."""
    found = set()
    for key, value in defaults.items():
        if isinstance(value, dict):
            found |= {f"{where}{key}"} if not value else open_maps(value, f"{where}{key}.")
    return found


def merge(base: dict, update: dict, open_paths: set[str], where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; a key unknown to ``base`` raises unless its
    parent is one of ``open_paths``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in out and where.rstrip(".") not in open_paths:
            raise ConfigError(f"unknown config key '{path}'")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, open_paths, f"{path}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> dict:
    """``a.b.c=value`` -> nested dict; the value is parsed as YAML (numbers, lists, null...)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(experiment: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the experiment file (if any), then each override in order."""
    cfg = _read_yaml(CONFIG_DIR / "default.yaml")
    open_paths = open_maps(cfg)
    if experiment:
        cfg = merge(cfg, _read_yaml(resolve_config_path(experiment)), open_paths)
    for item in overrides:
        cfg = merge(cfg, parse_override(item), open_paths)
    return cfg


def apply_scaling_rules(cfg: dict, world_size: int) -> dict:
    """The one place derived values are set: the learning rate scaled with the global batch."""
    cfg = copy.deepcopy(cfg)
    opt = cfg["optim"]
    global_batch = cfg["train"]["batch_size_per_gpu"] * world_size
    rule = opt["scaling_rule"]
    if rule == "sqrt_wrt_1024":
        opt["lr"] = opt["base_lr"] * math.sqrt(global_batch / 1024.0)
    elif rule == "linear_wrt_256":
        opt["lr"] = opt["base_lr"] * global_batch / 256.0
    elif rule == "none":
        opt["lr"] = opt["base_lr"]
    else:
        raise ConfigError(f"optim.scaling_rule '{rule}' is not one of sqrt_wrt_1024, linear_wrt_256, none")
    cfg["train"]["global_batch_size"] = global_batch
    return cfg


def git_sha() -> str:
    """HEAD of the checkout the trainer runs from, with ``-dirty`` when tracked files changed."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False).stdout.strip()

    sha = run("rev-parse", "HEAD") or "unknown"
    return sha + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")


def save_run_info(cfg: dict, out_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """``config.yaml`` (resolved) and ``run_info.json`` (git sha and caller facts) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    info = {"git_sha": git_sha(), **(extra or {})}
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
