"""The training loop end to end on the smoke config (tiny ViT, synthesized slide, CPU)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gpfm_engine.models import load_model
from training import train
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config import apply_scaling_rules, load_config
from training.export import export, teacher_backbone_state
from training.meta_arch import DistillMetaArch
from training.schedules import build_schedules

TERMS = ("dino_local", "dino_global", "koleo", "ibot", "total")


@pytest.fixture(scope="module")
def smoke_slide(slide_factory) -> Path:
    return slide_factory(size=(1024, 1024), mpp=0.5, seed=3)


def smoke_args(slide: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "smoke", "--output-dir", str(out), f"data.slides=[{slide}]", "data.synth.count=0",
            "train.log_period=1", *extra]


def test_one_step_changes_student_and_teacher(smoke_slide: Path, tmp_path: Path) -> None:
    cfg = apply_scaling_rules(load_config("smoke", [f"data.slides=[{smoke_slide}]", "data.synth.count=0"]), 1)
    torch.manual_seed(0)
    model = DistillMetaArch(cfg)
    optimizer = train.build_optimizer(cfg, model.get_params_groups())
    loader, _ = train.build_data(cfg, 14, 0, 1, 0, tmp_path, ((0.5,) * 3, (0.25,) * 3))
    student0 = {k: v.clone() for k, v in model.student.state_dict().items()}
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    values = build_schedules(cfg).at(1)  # lr > 0 after the first warm-up step; last layer still frozen
    train.apply_optim_scheduler(optimizer, values)
    losses = model.forward_backward(next(iter(loader)), values["teacher_temp"])
    optimizer.step()
    model.update_teacher(values["mom"])
    assert set(TERMS) <= set(losses) and all(math.isfinite(float(v)) for v in losses.values())
    changed = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student0[k])]
    assert "backbone.blocks.0.attn.qkv.weight" in changed and "dino_head.mlp.0.weight" in changed
    assert "dino_head.last_layer.weight_v" not in changed  # frozen by the last-layer lr schedule
    assert not torch.equal(model.teacher.state_dict()["backbone.blocks.0.attn.qkv.weight"],
                           teacher0["backbone.blocks.0.attn.qkv.weight"])


def test_smoke_loss_falls_and_every_term_is_finite_and_logged(smoke_slide: Path, tmp_path: Path) -> None:
    result = train.main(smoke_args(smoke_slide, tmp_path, "train.stop_at_iteration=20", "--no-resume"))
    totals = [h["total"] for h in result.metrics.history]
    assert len(totals) == 20
    assert sum(totals[-5:]) / 5 < sum(totals[:5]) / 5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        assert all(t in row and math.isfinite(row[t]) for t in TERMS), row
        assert {"lr", "wd", "mom", "teacher_temp", "grad_norm/backbone"} <= set(row)
    assert (tmp_path / "config.yaml").is_file() and json.loads((tmp_path / "run_info.json").read_text())["git_sha"]


def test_resume_gives_the_same_loss_sequence_bit_exact(smoke_slide: Path, tmp_path: Path) -> None:
    # Centring (not Sinkhorn) and drop-path make the EMA centre and the RNG part of the resumed state.
    common = ["optim.epochs=2", "train.epoch_length=3", "train.checkpoint_period=3", "train.num_workers=1",
              "dino.centering=centering", "model.drop_path_rate=0.2"]
    full = train.main(smoke_args(smoke_slide, tmp_path / "full", *common)).metrics.history
    train.main(smoke_args(smoke_slide, tmp_path / "split", *common, "train.stop_at_iteration=3"))
    resumed = train.main(smoke_args(smoke_slide, tmp_path / "split", *common)).metrics.history
    assert [h["iteration"] for h in resumed] == [3, 4, 5]
    assert resumed == full[3:]  # float equality of every term
    a = load_checkpoint(list_checkpoints(tmp_path / "full")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_round_trip_loads_strictly_and_matches_the_teacher(smoke_slide: Path, tmp_path: Path) -> None:
    arch = ["model.arch.embed_dim=192", "model.arch.depth=6", "model.arch.num_heads=3"]  # the registered gpfm-tiny
    train.main(smoke_args(smoke_slide, tmp_path, *arch, "train.stop_at_iteration=1", "train.batch_size_per_gpu=2"))
    ckpt_path = list_checkpoints(tmp_path)[-1]
    recipe = export(ckpt_path, tmp_path / "tiny.safetensors")
    assert recipe["iteration"] == 1 and len(recipe["sha256"]) == 64
    assert json.loads((tmp_path / "tiny.json").read_text())["sha256"] == recipe["sha256"]
    assert export(ckpt_path, tmp_path / "again.safetensors")["sha256"] == recipe["sha256"]  # byte-reproducible
    loaded = load_model("gpfm-tiny", weights=tmp_path / "tiny.safetensors")  # strict loader
    cfg = load_checkpoint(ckpt_path)["config"]
    teacher = DistillMetaArch(cfg).teacher.backbone.eval()
    teacher.load_state_dict(teacher_backbone_state(load_checkpoint(ckpt_path)))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), teacher(x))
    # The exported file also initialises a new run (model.pretrained), student and teacher alike.
    fresh = train.main(smoke_args(smoke_slide, tmp_path / "again", *arch, f"model.pretrained={tmp_path / 'tiny.safetensors'}",
                                  "train.stop_at_iteration=0")).model
    for net in (fresh.student, fresh.teacher):
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.backbone.state_dict().items() if k != "mask_token")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(smoke_slide: Path, tmp_path: Path, precision: str) -> None:
    history = train.main(smoke_args(smoke_slide, tmp_path, f"compute.precision={precision}", "train.stop_at_iteration=3",
                                    "crops.local_crops_number=1")).metrics.history
    assert len(history) == 3 and all(math.isfinite(v) for h in history for v in h.values())
