"""DINO loss on CLS tokens (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"; DINOv2, Oquab et al. 2023), which also carries GPFM's local-global alignment.

For student view s and teacher view t:  CE(s, t) = - mean_b sum_k p_t[b, k] log softmax(z_s[b] / tau_s)_k,
with p_t from :class:`TeacherCentering`. ``forward`` returns the SUM of CE over the (s, t) pairs it is
given, skipping a global crop paired with itself; the caller divides by the number of pairs of the
whole objective, so "local" (student local crops vs teacher global crops: the local-global
alignment) and "global" (the two global crops swapped) add up to the mean CE over all pairs, as in
DINOv2's ``forward_backward``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from training.losses.centering import CenteredTargetLoss


class DINOLoss(CenteredTargetLoss):
    def forward(self, student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor],
                skip_same_view: bool = False) -> torch.Tensor:
        """Sum over (student view, teacher view) pairs of the batch-mean cross-entropy.

        ``skip_same_view`` drops pair (i, i): the student's global crop i against the teacher's crop i.
        """
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for i, s in enumerate(student_logits):
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for j, t in enumerate(teacher_probs):
                if skip_same_view and i == j:
                    continue
                total = total - (t * log_p).sum(dim=-1).mean()
        return total

    @staticmethod
    def n_pairs(n_student: int, n_teacher: int, skip_same_view: bool) -> int:
        return n_student * n_teacher - (min(n_student, n_teacher) if skip_same_view else 0)
