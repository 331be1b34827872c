"""Expert CLS distillation loss (GPFM, Ma et al. 2024/2025, "unified knowledge distillation";
run config ``loss_name: radio`` -> cosine):  L = mean_b (1 - cos(h(s_b), e_b)),
where h is the student's head for this expert and e_b the frozen expert's CLS feature."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertCLSLoss(nn.Module):
    def forward(self, student: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """``student``, ``expert``: ``[N, D]``."""
        return (1.0 - F.cosine_similarity(student.float(), expert.float(), dim=-1)).mean()
