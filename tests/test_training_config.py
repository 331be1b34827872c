"""Layered configs, overrides, derived values and schedules."""
from __future__ import annotations

import math

import numpy as np
import pytest

from training.config import CONFIG_DIR, ConfigError, apply_scaling_rules, load_config, parse_override
from training.schedules import build_schedules, cosine_schedule


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads_and_resolves(name: str) -> None:
    cfg = apply_scaling_rules(load_config(None if name == "default" else name), world_size=2)
    s = build_schedules(cfg)
    assert len(s.lr) == cfg["optim"]["epochs"] * cfg["train"]["epoch_length"]
    assert cfg["optim"]["lr"] > 0 and cfg["train"]["global_batch_size"] == 2 * cfg["train"]["batch_size_per_gpu"]


def test_paper_recipe_values() -> None:
    cfg = apply_scaling_rules(load_config("paper_vitl"), world_size=16)
    assert cfg["train"]["global_batch_size"] == 1536
    assert math.isclose(cfg["optim"]["lr"], 4e-4 * math.sqrt(1.5))
    assert cfg["dino"]["head_n_prototypes"] == 65536 and not cfg["ibot"]["separate_head"]
    assert (cfg["crops"]["global_crops_size"], cfg["crops"]["local_crops_size"], cfg["crops"]["local_crops_number"]) == (224, 98, 8)
    assert {e["name"]: (e["cls_weight"], e["patch_weight"]) for e in cfg["experts"]} == {
        "uni": (1.0, 0.25), "phikon": (0.5, 0.125), "conch": (1.0, 0.0)}
    s = build_schedules(cfg)
    assert s.lr[0] == 0 and math.isclose(s.lr[50_000], cfg["optim"]["lr"])  # 40 warm-up epochs of 1250


def test_overrides_are_typed_and_layered() -> None:
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    cfg = load_config("smoke", ["optim.base_lr=0.5", "model.arch.depth=3", "data.mpp=null"])
    assert cfg["optim"]["base_lr"] == 0.5 and cfg["model"]["arch"]["depth"] == 3 and cfg["data"]["mpp"] is None
    assert cfg["crops"]["local_crops_scale"] == [0.05, 0.32]  # untouched defaults survive


@pytest.mark.parametrize("bad", ["optim.lrr=1", "nonsense=1", "optim"])
def test_unknown_keys_and_malformed_overrides_fail(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config("smoke", [bad])


def test_cosine_schedule_shape() -> None:
    s = cosine_schedule(1.0, 0.1, 10, warmup_iters=2, freeze_iters=1)
    assert s[0] == 0 and s[1] == 0 and s[2] == 0.5 and s[3] == 1.0
    assert np.all(np.diff(s[3:]) <= 0) and s[-1] > 0.1
