"""The published recipe (paper_vitl.yaml) builds: its experts are registered names, loadable from their
environment variables, wrapped by the trainer, and the ViT-L student/teacher pair is constructed.

No expert weights can be downloaded here, so the experts are tiny stand-ins of the same families in
their upstream file layouts; the ViT-L meta-architecture is built on the meta device (architecture
only, no step is run).
"""
from __future__ import annotations

import math

import pytest
import torch
from _expert_layouts import tiny_experts_from_env

from gpfm_engine.errors import WeightsError
from gpfm_engine.models import IMAGENET_MEAN, IMAGENET_STD, get_model_cfg
from training import train
from training.config import apply_scaling_rules, load_config
from training.experts import Expert, ExpertSpec, build_experts
from training.meta_arch import DistillMetaArch
from training.schedules import build_schedules

PAPER_EXPERTS = ["uni", "phikon", "conch"]
STUDENT_NORM = (IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No developer weights (env vars, HF cache) leak in."""
    for name in PAPER_EXPERTS:
        monkeypatch.delenv(get_model_cfg(name).weights_env, raising=False)
    monkeypatch.delenv("GPFM_ALLOW_DOWNLOAD", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_paper_config_without_weights_stops_at_the_first_expert_naming_what_to_set(tmp_path):
    """The real entry point gets as far as loading the experts, before any ViT-L is built."""
    with pytest.raises(WeightsError, match=r"model 'uni'.*set GPFM_UNI_WEIGHTS=PATH.*MahmoodLab/UNI/pytorch_model\.bin"):
        train.main(["--config", "paper_vitl", "--output-dir", str(tmp_path / "run"), "--no-resume"])
    cfg = load_config("paper_vitl")
    for entry, env in zip(cfg["experts"][1:], ("GPFM_PHIKON_WEIGHTS", "GPFM_CONCH_WEIGHTS")):
        with pytest.raises(WeightsError, match=f"model '{entry['name']}'.*set {env}=PATH"):
            build_experts([entry], STUDENT_NORM, torch.device("cpu"), None)


def test_paper_config_builds_with_stand_in_experts(monkeypatch, tmp_path):
    archs = tiny_experts_from_env(monkeypatch, tmp_path / "weights", PAPER_EXPERTS)
    cfg = apply_scaling_rules(load_config("paper_vitl"), world_size=16)
    assert all(e["weights"] is None for e in cfg["experts"])  # found through each model's env variable
    experts = build_experts(cfg["experts"], STUDENT_NORM, torch.device("cpu"), None)
    assert [e.spec.key for e in experts] == PAPER_EXPERTS
    assert [e.dim for e in experts] == [archs["uni"]["embed_dim"], archs["phikon"]["embed_dim"], archs["conch"]["contrast_dim"]]
    assert all(e.model.weights_source.startswith("env:") for e in experts)
    with torch.device("meta"):
        model = DistillMetaArch(cfg, experts)
    backbone = model.student.backbone
    assert (len(backbone.blocks), backbone.embed_dim, backbone.patch_size) == (24, 1024, 14)
    assert model.student.dino_head.last_layer.weight_v.shape == (65536, 256) and model.student.ibot_head is None
    for e in experts:
        head = model.student.expert_heads[e.spec.key]
        assert head.mlp[0].weight.shape == (256, 1024) and head.last_layer.weight_v.shape == (e.dim, 256)
    assert not any(k.startswith("expert_heads") for k in model.teacher.state_dict())
    assert {k: model.weight_of(k) for k in ("expert_cls/uni", "expert_patch/uni", "expert_cls/phikon",
                                            "expert_patch/phikon", "expert_cls/conch")} == {
        "expert_cls/uni": 1.0, "expert_patch/uni": 0.25, "expert_cls/phikon": 0.5, "expert_patch/phikon": 0.125,
        "expert_cls/conch": 1.0}
    groups = model.get_params_groups()
    optimizer = train.build_optimizer(cfg, groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.student.parameters()))
    schedules = build_schedules(cfg)
    assert len(schedules.lr) == 500_000 and math.isclose(schedules.lr[50_000], cfg["optim"]["lr"])


def test_registered_experts_wrap_into_a_training_step(monkeypatch, tmp_path):
    """Phikon's 14x14 tokens (patch 16 at 224) meet the 16x16 student grid through the bicubic resize;
    CONCH (native 448) takes the 224 px crops and gives its unit-norm 512-d-style target."""
    archs = tiny_experts_from_env(monkeypatch, tmp_path / "weights", ["phikon", "conch"])
    entries = [{"name": "phikon", "cls_weight": 0.5, "patch_weight": 0.125, "head_bottleneck_dim": 16},
               {"name": "conch", "cls_weight": 1.0, "patch_weight": 0.0, "head_bottleneck_dim": 16}]
    experts = build_experts(entries, ((0.5,) * 3, (0.25,) * 3), torch.device("cpu"), None)
    crops = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    (p_cls, p_patch), (c_cls, c_patch) = (e(crops) for e in experts)
    assert p_cls.shape == (4, archs["phikon"]["embed_dim"]) and p_patch.shape == (4, 196, archs["phikon"]["embed_dim"])
    assert c_cls.shape == (4, archs["conch"]["contrast_dim"]) and c_patch is None
    assert torch.allclose(c_cls.norm(dim=-1), torch.ones(4), atol=1e-5)
    cfg = apply_scaling_rules(load_config("smoke", ["model.arch.embed_dim=16", "model.arch.depth=1",
                                                    "model.arch.num_heads=2", "crops.local_crops_number=0"]), 1)
    model = DistillMetaArch(cfg, experts)
    batch = {"global_crops": crops, "local_crops": None, "masks": torch.zeros(4, 256, dtype=torch.bool)}
    losses = model.forward_backward(batch, teacher_temp=0.04)
    for term in ("expert_cls/phikon", "expert_patch/phikon", "expert_cls/conch"):
        assert math.isfinite(float(losses[term])) and float(losses[term]) > 0, term
    assert "expert_patch/conch" not in losses
    for key in ("phikon", "conch"):
        assert model.student.expert_heads[key].mlp[0].weight.grad.abs().sum() > 0


def test_conch_patch_distillation_is_refused(monkeypatch, tmp_path):
    """One head per expert cannot map to a 512-d feature and 768-d (here 32-d) trunk tokens at once."""
    tiny_experts_from_env(monkeypatch, tmp_path / "weights", ["conch"])
    with pytest.raises(ValueError, match="expert 'conch'.*not its 32-d CLS token.*set patch_weight 0"):
        build_experts([{"name": "conch", "cls_weight": 1.0, "patch_weight": 0.1}], STUDENT_NORM, torch.device("cpu"), None)
    model = torch.nn.Linear(3, 3)  # no forward_features at all
    with pytest.raises(ValueError, match="gives no patch tokens"):
        Expert(ExpertSpec("lin", 1.0, 0.5), model, 3, STUDENT_NORM, STUDENT_NORM)
