"""Frozen expert teachers for GPFM's expert distillation, loaded by ``gpfm_engine`` model name.

An expert sees the unmasked global crops (GPFM ``get_distill_teacher_output``), in eval mode,
without gradients, and gives a CLS target ``[N, D_e]`` and, when its patch weight is positive,
patch-token targets ``[N, P_e, D_e]``. The CLS target is the model's feature (``forward``): the CLS
token after the final norm for the ViTs (UNI, Phikon), the normalised 512-d image-text embedding
for CONCH, as GPFM's ``fms.py`` takes them. Patch targets come from ``forward_features`` and need
the feature to be the CLS token of the same width, because one head serves both losses
(``feature_dim == embed_dim``; CONCH fails this, and GPFM distils no CONCH patch tokens).
Crops arrive normalised with the student's mean/std and are re-normalised to the expert's
registered mean/std when they differ (GPFM fed CONCH ImageNet statistics; the registry's own
values are used here). They keep their size (224 px global crops): an expert with another native
size (CONCH, 448) resamples its position embeddings, as timm did for GPFM. Experts are plain objects, not sub-modules of the meta-architecture, so they are never saved,
sharded, EMA-updated or given to the optimizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ExpertSpec:
    """One ``experts:`` config entry."""

    name: str
    cls_weight: float
    patch_weight: float
    weights: str | None = None
    head_bottleneck_dim: int = 256

    @property
    def key(self) -> str:
        """Module-safe name (``ModuleDict`` keys cannot contain dots)."""
        return re.sub(r"\W", "_", self.name)


class Expert:
    def __init__(self, spec: ExpertSpec, model: nn.Module, feature_dim: int,
                 student_norm: tuple[tuple[float, ...], tuple[float, ...]],
                 expert_norm: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.dim = feature_dim
        self.gives_patch_tokens = spec.patch_weight > 0
        if self.gives_patch_tokens and not hasattr(model, "forward_features"):
            raise ValueError(f"expert '{spec.name}' gives no patch tokens but patch_weight={spec.patch_weight}")
        if self.gives_patch_tokens and getattr(model, "embed_dim", feature_dim) != feature_dim:
            raise ValueError(f"expert '{spec.name}': its feature ({feature_dim}-d) is not its {model.embed_dim}-d CLS token, "
                             f"so one head cannot serve CLS and patch targets; set patch_weight 0 (got {spec.patch_weight})")
        self._renorm = None
        if tuple(student_norm[0]) != tuple(expert_norm[0]) or tuple(student_norm[1]) != tuple(expert_norm[1]):
            s_mean, s_std, e_mean, e_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (*student_norm, *expert_norm))
            self._renorm = (s_std / e_std, (s_mean - e_mean) / e_std)

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._renorm is not None:
            scale, shift = (t.to(crops.device, crops.dtype) for t in self._renorm)
            crops = crops * scale + shift
        if not self.gives_patch_tokens:
            return self.model(crops), None
        out = self.model.forward_features(crops)
        return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def build_experts(entries: list[dict], student_norm: tuple, device: torch.device, dtype: torch.dtype | None) -> list[Expert]:
    """Experts from config entries through ``gpfm_engine.models.load_model`` (imported only when used)."""
    if not entries:
        return []
    from gpfm_engine.models import get_model_cfg, load_model

    experts = []
    for entry in entries:
        spec = ExpertSpec(**entry)
        cfg = get_model_cfg(spec.name)
        model = load_model(spec.name, weights=spec.weights, device=str(device), dtype=dtype)
        experts.append(Expert(spec, model, cfg.feature_dim, student_norm, (cfg.mean, cfg.std)))
    return experts
