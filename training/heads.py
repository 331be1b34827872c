"""Projection heads: the DINO/iBOT prototype head and the per-expert distillation heads.

Both are :class:`DINOHead` (DINOv2 ``layers/dino_head.py``): an MLP to a bottleneck, L2
normalisation, then a weight-normalised linear layer without bias. An expert head is the
``nlayers=1`` case, as GPFM builds it: Linear(D -> 256) -> L2 -> WN-Linear(256 -> D_expert).
Weight norm is written out (``weight_g``, ``weight_v`` parameters, the names of the GPFM release)
instead of a parametrisation, so EMA, FSDP sharding and state dicts see plain tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """y = x W^T with W = g * v / ||v|| row-wise (Salimans & Kingma 2016); g starts at 1."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """MLP (``nlayers`` Linear, GELU between) to ``bottleneck_dim``, L2-normalise, WN-Linear to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"a head needs at least one layer, got nlayers={nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=mlp_bias))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
