"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2).

Kozachenko-Leonenko differential-entropy estimator on L2-normalised features x_i of one batch:
L = - (1/n) sum_i log(d_i + eps), d_i = || x_i - x_nn(i) || the distance to the nearest other sample.
Pushes CLS features to spread uniformly. Computed on the local batch of each rank, per global crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: ``[n, D]`` with n >= 2."""
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            sims = x @ x.t()
            sims.fill_diagonal_(-2.0)
            nearest = sims.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
        return -torch.log(distances + self.eps).mean()
