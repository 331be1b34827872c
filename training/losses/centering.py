"""Teacher-side target normalisation shared by the DINO and iBOT losses.

Two modes (DINOv2 ``train.centering``): ``centering`` = softmax((t - c) / T) with the centre ``c``
an EMA (momentum m) of the batch-mean teacher logits, all-reduced over ranks (Caron et al. 2021);
``sinkhorn_knopp`` = three Sinkhorn-Knopp iterations giving an equipartitioned assignment over the
global batch (SwAV, Caron et al. 2020; DINOv2 option). The centre is a buffer so it is checkpointed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

MODES = ("centering", "sinkhorn_knopp")


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


class TeacherCentering(nn.Module):
    """Turns teacher logits ``[N, K]`` into target probabilities and keeps the running centre."""

    def __init__(self, out_dim: int, mode: str = "centering", momentum: float = 0.9, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"centering mode '{mode}' is not one of {MODES}")
        self.mode = mode
        self.momentum = momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        logits = teacher_logits.float()
        if self.mode == "sinkhorn_knopp":
            return self._sinkhorn_knopp(logits, temp)
        probs = torch.softmax((logits - self.center) / temp, dim=-1)
        self._update_center(logits)
        return probs

    def _update_center(self, logits: torch.Tensor) -> None:
        stats = torch.cat([logits.sum(0), logits.new_tensor([logits.shape[0]])])
        _all_reduce(stats)
        if stats[-1] > 0:
            batch_center = (stats[:-1] / stats[-1]).unsqueeze(0)
            self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)

    def _sinkhorn_knopp(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        # A global constant subtracted before exp cancels in the first normalisation and avoids overflow.
        shift = _all_reduce(logits.max().reshape(1).clone() if logits.numel() else logits.new_zeros(1), dist.ReduceOp.MAX)
        q = torch.exp((logits - shift) / temp).t()  # K x B
        n_samples = _all_reduce(logits.new_tensor([float(logits.shape[0])]))
        n_protos = q.shape[0]
        q /= _all_reduce(q.sum().reshape(1))
        for _ in range(self.sinkhorn_iterations):
            q /= _all_reduce(q.sum(dim=1, keepdim=True))
            q /= n_protos
            q /= q.sum(dim=0, keepdim=True)
            q /= n_samples
        q *= n_samples
        return q.t()


class CenteredTargetLoss(nn.Module):
    """Base of the losses whose targets are centred teacher probabilities (DINO CLS, iBOT patch).

    Owns the student temperature and the ``TeacherCentering`` state, so the two losses differ only
    in how they pair student and teacher tokens (their ``forward``).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, centering: str = "centering",
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = TeacherCentering(out_dim, centering, center_momentum)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets from teacher logits (updates the centre in ``centering`` mode)."""
        return self.centering(teacher_logits, teacher_temp)
