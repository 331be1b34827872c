"""Backbone plus heads as one module with one forward, the unit that DDP/FSDP wrap and EMA pairs.

A single forward per step matters: DDP and FSDP hook ``forward``/``backward`` of the module they
wrap, so the global crops, the local crops and every head run inside one call. The student and
the teacher are both :class:`DistillNet`; only the student has expert heads.
"""
from __future__ import annotations

import torch
from torch import nn

from training.heads import DINOHead


class DistillNet(nn.Module):
    def __init__(self, backbone: nn.Module, dino_head: DINOHead, ibot_head: DINOHead | None = None,
                 expert_heads: dict[str, DINOHead] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        self.expert_heads = nn.ModuleDict(expert_heads or {})

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, masked_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Head outputs for the crops.

        ``masks`` [N_g, P] replace global-crop patch tokens by the mask token (student only);
        ``masked_index`` selects rows of the flattened global patch tokens [N_g * P] for iBOT (both).
        Keys: ``cls`` (pre-head global CLS), ``dino_global``, ``dino_local``, ``ibot``,
        ``expert_cls/<key>`` [N_g, D_e], ``expert_patch/<key>`` [N_g, P, D_e].
        """
        feats = self.backbone.forward_features(global_crops, masks)
        cls_g, patches = feats["x_norm_clstoken"], feats["x_norm_patchtokens"]
        n_g = cls_g.shape[0]
        head_in = [cls_g]
        if local_crops is not None:
            head_in.append(self.backbone.forward_features(local_crops)["x_norm_clstoken"])
        n_cls = sum(t.shape[0] for t in head_in)
        masked = patches.flatten(0, 1).index_select(0, masked_index) if masked_index is not None else None
        if masked is not None and self.ibot_head is None:
            head_in.append(masked)
        head_out = self.dino_head(torch.cat(head_in))
        out = {"cls": cls_g, "dino_global": head_out[:n_g], "dino_local": head_out[n_g:n_cls]}
        if masked is not None:
            out["ibot"] = head_out[n_cls:] if self.ibot_head is None else self.ibot_head(masked)
        for key, head in self.expert_heads.items():
            y = head(torch.cat([cls_g, patches.flatten(0, 1)]))
            out[f"expert_cls/{key}"] = y[:n_g]
            out[f"expert_patch/{key}"] = y[n_g:].reshape(n_g, patches.shape[1], -1)
        return out
