"""Expert distillation: heads, targets and losses through the meta-architecture's step."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gpfm_engine.models.vit import VisionTransformer
from training.config import apply_scaling_rules, load_config
from training.experts import Expert, ExpertSpec
from training.meta_arch import DistillMetaArch

DIM = 16
NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def small_cfg(*extra: str) -> dict:
    overrides = [f"model.arch.embed_dim={DIM}", "model.arch.depth=1", "model.arch.num_heads=2",
                 "crops.local_crops_number=0", *extra]
    return apply_scaling_rules(load_config("smoke", overrides), 1)


def unit_norm_vit(patch_size: int) -> VisionTransformer:
    """A ViT whose final norm gives unit-length tokens, so an identity head reproduces them exactly."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=DIM, depth=1, num_heads=2, init_values=1.0)
    with torch.no_grad():
        vit.norm.weight.fill_(1 / math.sqrt(DIM))
    return vit


def set_identity(head: nn.Module) -> None:
    with torch.no_grad():
        head.mlp[0].weight.copy_(torch.eye(DIM))
        head.mlp[0].bias.zero_()
        head.last_layer.weight_v.copy_(torch.eye(DIM))
        head.last_layer.weight_g.fill_(1.0)


def batch(n: int = 2, size: int = 224) -> dict:
    torch.manual_seed(1)
    return {"global_crops": torch.randn(2 * n, 3, size, size), "local_crops": None,
            "masks": torch.zeros(2 * n, (size // 14) ** 2, dtype=torch.bool)}


def test_student_equal_to_expert_with_identity_head_has_zero_loss() -> None:
    cfg = small_cfg("ibot.mask_sample_probability=0.0")
    expert_vit = unit_norm_vit(14)
    expert = Expert(ExpertSpec("same", cls_weight=1.0, patch_weight=1.0, head_bottleneck_dim=DIM), expert_vit, DIM, NORM, NORM)
    model = DistillMetaArch(cfg, [expert])
    model.student.backbone.load_state_dict(copy.deepcopy(expert_vit.state_dict()))
    set_identity(model.student.expert_heads["same"])
    losses = model.forward_backward(batch(), teacher_temp=0.04)
    assert losses["expert_cls/same"].abs() < 1e-6 and losses["expert_patch/same"].abs() < 1e-6
    assert model.student.expert_heads["same"].mlp[0].weight.grad.abs().max() < 1e-4


def test_expert_with_14x14_tokens_against_16x16_student() -> None:
    cfg = small_cfg()
    expert = Expert(ExpertSpec("uni_like", 1.0, 0.25), unit_norm_vit(16), DIM, NORM, NORM)  # patch 16: 14x14 tokens
    model = DistillMetaArch(cfg, [expert])
    cls, patch = expert(batch()["global_crops"])
    assert cls.shape == (4, DIM) and patch.shape == (4, 196, DIM)
    losses = model.forward_backward(batch(), teacher_temp=0.04)
    assert math.isfinite(float(losses["expert_patch/uni_like"])) and float(losses["expert_patch/uni_like"]) > 0
    assert model.student.expert_heads["uni_like"].last_layer.weight_v.grad is not None
    weighted = sum(model.weight_of(k) * v for k, v in losses.items() if k != "total")
    assert torch.allclose(losses["total"], weighted)


def test_expert_renormalises_to_its_own_statistics() -> None:
    seen = {}

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["x"] = x
            return x.mean((2, 3))

    expert = Expert(ExpertSpec("probe", 1.0, 0.0), Probe(), 3, NORM, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    pixels = torch.rand(1, 3, 4, 4)
    expert((pixels - 0.5) / 0.25)
    assert torch.allclose(seen["x"], pixels, atol=1e-6)
    with pytest.raises(ValueError, match="no patch tokens"):
        Expert(ExpertSpec("probe", 1.0, 0.5), Probe(), 3, NORM, NORM)
