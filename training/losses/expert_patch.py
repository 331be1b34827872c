"""Expert patch-token distillation loss (GPFM ``kl_loss.py`` ``FeatureLoss(alpha=0.9, beta=0.1)``).

L = alpha * mean_{b,p} (1 - cos(h(s_bp), e_bp)) + beta * SmoothL1(h(s), e)   (SmoothL1 with beta=1, mean),
where the expert token grid is resized bicubically to the student's when they differ (UNI and
Phikon give 14x14 tokens at 224 px with patch 16; the student has 16x16 with patch 14).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _square_grid(n_tokens: int) -> tuple[int, int]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not form a square grid; pass the grid shape")
    return side, side


def resize_token_grid(tokens: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """``[N, h*w, D]`` tokens on grid ``src`` -> ``[N, H*W, D]`` on grid ``dst`` (bicubic, align_corners=False)."""
    if src == dst:
        return tokens
    n, _, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(n, d, *src)
    grid = F.interpolate(grid.float(), size=dst, mode="bicubic", align_corners=False)
    return grid.reshape(n, d, dst[0] * dst[1]).transpose(1, 2)


class ExpertPatchLoss(nn.Module):
    def __init__(self, alpha: float = 0.9, beta: float = 0.1) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta

    def forward(self, student: torch.Tensor, expert: torch.Tensor, student_grid: tuple[int, int] | None = None,
                expert_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``student``: ``[N, P, D]``; ``expert``: ``[N, Q, D]`` (grids default to square)."""
        s_grid = student_grid or _square_grid(student.shape[1])
        e_grid = expert_grid or _square_grid(expert.shape[1])
        target = resize_token_grid(expert.float(), e_grid, s_grid)
        s = student.float()
        cos_term = (1.0 - F.cosine_similarity(s, target, dim=-1)).mean()
        return self.alpha * cos_term + self.beta * F.smooth_l1_loss(s, target)
