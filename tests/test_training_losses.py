"""Each loss term of training/losses against a hand computation on small hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import DINOLoss, ExpertCLSLoss, ExpertPatchLoss, IBOTPatchLoss, KoLeoLoss, resize_token_grid
from training.losses.centering import TeacherCentering


def test_dino_loss_is_cross_entropy_over_view_pairs() -> None:
    torch.manual_seed(0)
    loss = DINOLoss(out_dim=5, student_temp=0.1)
    s = [torch.randn(3, 5), torch.randn(3, 5)]
    t = [torch.softmax(torch.randn(3, 5), -1), torch.softmax(torch.randn(3, 5), -1)]
    ce = lambda si, ti: -(ti * F.log_softmax(si / 0.1, -1)).sum(-1).mean()  # noqa: E731
    assert torch.allclose(loss(s, t), ce(s[0], t[0]) + ce(s[0], t[1]) + ce(s[1], t[0]) + ce(s[1], t[1]))
    assert torch.allclose(loss(s, t, skip_same_view=True), ce(s[0], t[1]) + ce(s[1], t[0]))
    assert DINOLoss.n_pairs(2, 2, True) == 2 and DINOLoss.n_pairs(8, 2, False) == 16


def test_centering_softmax_and_ema_update() -> None:
    c = TeacherCentering(3, "centering", momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = c(logits, temp=0.5)
    assert torch.allclose(probs, torch.softmax(logits / 0.5, -1))  # centre starts at 0
    assert torch.allclose(c.center, 0.1 * logits.mean(0, keepdim=True))
    probs2 = c(logits, temp=0.5)
    assert torch.allclose(probs2, torch.softmax((logits - 0.1 * logits.mean(0)) / 0.5, -1))


def test_sinkhorn_knopp_equipartitions() -> None:
    torch.manual_seed(1)
    c = TeacherCentering(8, "sinkhorn_knopp", sinkhorn_iterations=50)
    q = c(torch.randn(16, 8), temp=0.5)
    assert torch.allclose(q.sum(-1), torch.ones(16), atol=1e-5)          # each sample a distribution
    assert torch.allclose(q.sum(0), torch.full((8,), 16 / 8), atol=1e-2)  # prototypes used equally
    assert torch.equal(c.center, torch.zeros(1, 8))                        # no centre in this mode


def test_sinkhorn_is_unchanged_by_a_constant_shift() -> None:
    c = TeacherCentering(4, "sinkhorn_knopp")
    x = torch.randn(6, 4)
    assert torch.allclose(c(x, 0.05), c(x + 2.0, 0.05), atol=1e-5)  # float32 rounding of x + 2 only


def test_ibot_loss_weights_images_equally() -> None:
    torch.manual_seed(2)
    masks = torch.tensor([[True, True, False, False], [False, True, False, False], [False, False, False, False]])
    m = int(masks.sum())
    s, t = torch.randn(m, 6), torch.softmax(torch.randn(m, 6), -1)
    per_token = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (per_token[0] / 2 + per_token[1] / 2 + per_token[2] / 1) / 3  # image 3 has no mask but counts
    assert torch.allclose(IBOTPatchLoss(6)(s, t, masks), expected)
    assert IBOTPatchLoss(6)(s[:0], t[:0], torch.zeros_like(masks)) == 0


def test_koleo_matches_nearest_neighbour_formula() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    xn = F.normalize(x, dim=-1)
    d01, d02, d12 = (xn[0] - xn[1]).norm(), (xn[0] - xn[2]).norm(), (xn[1] - xn[2]).norm()
    nearest = torch.stack([torch.min(d01, d02), torch.min(d01, d12), torch.min(d02, d12)])
    assert torch.allclose(KoLeoLoss()(x), -torch.log(nearest + 1e-8).mean(), atol=1e-6)


def test_expert_cls_loss_is_one_minus_cosine() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert ExpertCLSLoss()(a, 3 * a).abs() < 1e-7
    assert torch.allclose(ExpertCLSLoss()(a, a.flip(-1)), torch.tensor(1.0))


def test_expert_patch_loss_formula_on_equal_grids() -> None:
    torch.manual_seed(3)
    s, e = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    expected = 0.9 * (1 - F.cosine_similarity(s, e, dim=-1)).mean() + 0.1 * F.smooth_l1_loss(s, e)
    assert torch.allclose(ExpertPatchLoss()(s, e), expected)


def test_expert_patch_loss_resizes_14_to_16_grid_bicubically() -> None:
    torch.manual_seed(4)
    expert = torch.randn(2, 14 * 14, 8)
    target = F.interpolate(expert.transpose(1, 2).reshape(2, 8, 14, 14), size=(16, 16), mode="bicubic",
                           align_corners=False).reshape(2, 8, 256).transpose(1, 2)
    assert torch.allclose(resize_token_grid(expert, (14, 14), (16, 16)), target)
    assert ExpertPatchLoss()(target, expert).abs() < 1e-6          # student equal to the resized expert
    assert ExpertPatchLoss()(torch.randn(2, 256, 8), expert) > 0.1
    with pytest.raises(ValueError, match="square"):
        ExpertPatchLoss()(torch.randn(1, 10, 8), expert[:1])


@pytest.mark.parametrize("k", [3, 7])
def test_dino_loss_of_uniform_student_is_log_k(k: int) -> None:
    s = [torch.zeros(4, k)]
    t = [torch.softmax(torch.randn(4, k), -1)]
    assert math.isclose(float(DINOLoss(k)(s, t)), math.log(k), rel_tol=1e-6)
