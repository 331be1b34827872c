"""iBOT masked-patch loss (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer";
DINOv2 ``ibot_patch_loss.py``).

The student sees global crops with some patch tokens replaced by the mask token; the teacher sees
them intact. For each masked position the student's prototype distribution is pulled to the
teacher's:  L = (1 / N_img) sum_images (1 / n_masked(img)) sum_{masked p} - sum_k q_t[p, k] log softmax(z_s[p] / tau_s)_k,
so every image with masks weighs the same whatever its mask ratio (images without masks count in
N_img, as upstream). Teacher targets come from this loss's own :class:`TeacherCentering`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.losses.centering import CenteredTargetLoss


class IBOTPatchLoss(CenteredTargetLoss):
    def forward(self, student_logits_masked: torch.Tensor, teacher_probs_masked: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        """``student_logits_masked``/``teacher_probs_masked``: ``[M, K]`` rows in ``masks.nonzero()`` order;
        ``masks``: ``[N_img, P]`` bool."""
        if student_logits_masked.shape[0] == 0:
            return student_logits_masked.new_zeros((), dtype=torch.float32)
        per_token = -(teacher_probs_masked * F.log_softmax(student_logits_masked.float() / self.student_temp, dim=-1)).sum(-1)
        counts = masks.sum(dim=-1).clamp(min=1).float()
        weights = (1.0 / counts).unsqueeze(-1).expand_as(masks)[masks]
        return (per_token * weights).sum() / masks.shape[0]
