"""The distillation meta-architecture: it owns every model-side verb of a training step.

Student and EMA teacher share the gpfm_engine ViT; the loss is GPFM's unified knowledge
distillation (gpfm.md §3):

  total = w_dino * (DINO_local + DINO_global) + w_koleo * sum_crops KoLeo + w_ibot * iBOT
        + sum_experts [w_cls,e * (1 - cos)(h_e(cls), e_cls) + w_patch,e * FeatLoss(h_e(patch), e_patch)]

DINO_local (student local crops vs teacher global crops: the local-global alignment) and
DINO_global (the two global crops swapped) are each the sum of cross-entropies over their view
pairs divided by the number of pairs of both, so together they are the mean over all pairs
(DINOv2's scaling). A term is on when its weight is positive; every term is returned under its
own key. The training loop only calls :meth:`forward_backward`, :meth:`update_teacher`,
:meth:`get_params_groups`, :meth:`clip_gradients` and :meth:`prepare_for_distributed_training`.
"""
from __future__ import annotations

import copy
import re
from typing import Sequence

import torch
from torch import nn

from training import distributed
from training.experts import Expert
from training.heads import DINOHead
from training.losses import DINOLoss, ExpertCLSLoss, ExpertPatchLoss, IBOTPatchLoss, KoLeoLoss
from training.networks import DistillNet

_BLOCK_ID = re.compile(r"\.blocks\.(?:\d+\.)?(\d+)\.")


def build_backbone(model_cfg: dict, drop_path_rate: float) -> nn.Module:
    """The registered architecture ``model.name`` with ``model.arch`` overrides (random weights)."""
    from gpfm_engine.models import get_model_cfg

    return get_model_cfg(model_cfg["name"]).build(drop_path_rate=drop_path_rate,
                                                  drop_path_uniform=model_cfg["drop_path_uniform"], **model_cfg["arch"])


class DistillMetaArch(nn.Module):
    def __init__(self, cfg: dict, experts: Sequence[Expert] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        dino, ibot = cfg["dino"], cfg["ibot"]
        self.experts = list(experts)
        self.w = {"dino": dino["loss_weight"], "koleo": dino["koleo_loss_weight"], "ibot": ibot["loss_weight"]}
        student_backbone = build_backbone(cfg["model"], cfg["model"]["drop_path_rate"])
        teacher_backbone = build_backbone(cfg["model"], 0.0)
        dim = student_backbone.embed_dim

        def proto_head(c: dict) -> DINOHead:
            return DINOHead(dim, c["head_n_prototypes"], c["head_nlayers"], c["head_hidden_dim"], c["head_bottleneck_dim"])

        ibot_head = proto_head(ibot) if ibot["separate_head"] else None
        expert_heads = {e.spec.key: DINOHead(dim, e.dim, nlayers=1, bottleneck_dim=e.spec.head_bottleneck_dim)
                        for e in self.experts}
        self.student = DistillNet(student_backbone, proto_head(dino), ibot_head, expert_heads)
        self.teacher = DistillNet(teacher_backbone, copy.deepcopy(self.student.dino_head), copy.deepcopy(ibot_head))
        self.teacher.load_state_dict(self._teacher_view(self.student.state_dict()))
        self.teacher.requires_grad_(False)
        n_protos_ibot = (ibot if ibot["separate_head"] else dino)["head_n_prototypes"]
        self.dino_loss = DINOLoss(dino["head_n_prototypes"], dino["student_temp"], dino["centering"], dino["center_momentum"])
        self.ibot_loss = IBOTPatchLoss(n_protos_ibot, ibot["student_temp"], dino["centering"], ibot["center_momentum"])
        self.koleo_loss = KoLeoLoss()
        self.expert_cls_loss = ExpertCLSLoss()
        self.expert_patch_loss = ExpertPatchLoss(cfg["distill"]["patch_alpha"], cfg["distill"]["patch_beta"])
        # The module the step calls for the student (a DDP wrapper once wrapped). Kept in a plain
        # dict so the wrapper is not registered as a second copy of the student's parameters.
        self._runtime: dict[str, nn.Module] = {"student": self.student}
        precision = cfg["compute"]["precision"]
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def _teacher_view(self, student_sd: dict) -> dict:
        return {k: v for k, v in student_sd.items() if not k.startswith("expert_heads.")}

    # -- one step ---------------------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None)

    @torch.no_grad()
    def _teacher_targets(self, global_crops: torch.Tensor, masked_index: torch.Tensor | None,
                         teacher_temp: float) -> dict[str, object]:
        with self._autocast(global_crops.device):
            out = self.teacher(global_crops, masked_index=masked_index)
        targets: dict[str, object] = {"dino": list(self.dino_loss.teacher_probs(out["dino_global"], teacher_temp).chunk(2))}
        if masked_index is not None:
            targets["ibot"] = self.ibot_loss.teacher_probs(out["ibot"], teacher_temp)
        for e in self.experts:
            with self._autocast(global_crops.device):
                targets[f"expert/{e.spec.key}"] = e(global_crops)
        return targets

    def _self_distillation_losses(self, s: dict, t: dict, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        n_local = 2 * s["dino_local"].shape[0] // s["dino_global"].shape[0]  # local crops per image
        student_global = list(s["dino_global"].chunk(2))
        n_pairs = DINOLoss.n_pairs(2, 2, True) + DINOLoss.n_pairs(n_local, 2, False)
        if self.w["dino"] > 0:
            if n_local:
                losses["dino_local"] = self.dino_loss(list(s["dino_local"].chunk(n_local)), t["dino"]) / n_pairs
            losses["dino_global"] = self.dino_loss(student_global, t["dino"], skip_same_view=True) / n_pairs
        if self.w["koleo"] > 0:
            losses["koleo"] = sum(self.koleo_loss(c) for c in s["cls"].chunk(2))
        if self.w["ibot"] > 0:
            losses["ibot"] = self.ibot_loss(s["ibot"], t["ibot"], masks)
        return losses

    def _expert_losses(self, s: dict, t: dict) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for e in self.experts:
            e_cls, e_patch = t[f"expert/{e.spec.key}"]
            if e.spec.cls_weight > 0:
                losses[f"expert_cls/{e.spec.key}"] = self.expert_cls_loss(s[f"expert_cls/{e.spec.key}"], e_cls)
            if e.spec.patch_weight > 0:
                losses[f"expert_patch/{e.spec.key}"] = self.expert_patch_loss(s[f"expert_patch/{e.spec.key}"], e_patch)
        return losses

    def weight_of(self, term: str) -> float:
        kind, _, key = term.partition("/")
        if kind in ("dino_local", "dino_global"):
            return self.w["dino"]
        if kind in self.w:
            return self.w[kind]
        spec = next(e.spec for e in self.experts if e.spec.key == key)
        return spec.cls_weight if kind == "expert_cls" else spec.patch_weight

    def forward_backward(self, batch: dict[str, torch.Tensor], teacher_temp: float,
                         scaler: torch.amp.GradScaler | None = None) -> dict[str, torch.Tensor]:
        """Teacher and expert targets, student forward, every loss term, backward of the weighted sum.

        Returns the detached terms and ``total``; gradients are left in the student.
        """
        device = next(self.student.parameters()).device
        global_crops = batch["global_crops"].to(device, non_blocking=True)
        local_crops = batch["local_crops"].to(device, non_blocking=True) if batch["local_crops"] is not None else None
        masks = batch["masks"].to(device, non_blocking=True)
        masked_index = masks.flatten().nonzero().flatten() if self.w["ibot"] > 0 else None
        targets = self._teacher_targets(global_crops, masked_index, teacher_temp)
        with self._autocast(device):
            s = self._runtime["student"](global_crops, local_crops, masks if self.w["ibot"] > 0 else None, masked_index)
        losses = self._self_distillation_losses(s, targets, masks) | self._expert_losses(s, targets)
        total = sum(self.weight_of(k) * v for k, v in losses.items())
        (scaler.scale(total) if scaler is not None else total).backward()
        return {k: v.detach() for k, v in losses.items()} | {"total": total.detach()}

    # -- teacher, optimizer, distribution ---------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, over the parameters they share (by name).

        The pairs are looked up at every call: FSDP swaps the registered tensors between sharded and
        unsharded forms, so a cached list could point at the wrong ones.
        """
        student = dict(self.student.named_parameters())
        pairs = [(distributed.local_tensor(p), distributed.local_tensor(student[n])) for n, p in self.teacher.named_parameters()]
        t, s = [a for a, _ in pairs], [b for _, b in pairs]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def get_params_groups(self) -> list[dict]:
        """One entry per student parameter with DINOv2's multipliers (fused by the caller).

        lr: layer-wise decay ``rate ** (depth + 1 - layer_id)`` (embeddings layer 0, block i layer i+1,
        final norm and heads depth+1), times ``patch_embed_lr_mult`` for the patch embedding;
        no weight decay for biases, norms and LayerScale gammas; ``is_last_layer`` for the heads'
        weight-normed layers (frozen at the start by the last-layer lr schedule).
        """
        opt = self.cfg["optim"]
        depth = len(self.student.backbone.blocks)
        groups = []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            layer_id = depth + 1
            if name.startswith("backbone."):
                if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
                    layer_id = 0
                elif (m := _BLOCK_ID.search("." + name)) is not None:
                    layer_id = int(m.group(1)) + 1
            lr_mult = opt["layerwise_decay"] ** (depth + 1 - layer_id)
            if "patch_embed" in name:
                lr_mult *= opt["patch_embed_lr_mult"]
            wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
            groups.append({"params": p, "name": name, "lr_multiplier": lr_mult, "wd_multiplier": wd_mult,
                           "is_last_layer": "last_layer" in name})
        return groups

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        """Clip each student part (backbone, each head) separately, as DINOv2; returns pre-clip norms."""
        norms: dict[str, float] = {}
        if max_norm <= 0:
            return norms
        for name, part in self.student.named_children():
            params = [p for p in part.parameters() if p.grad is not None]
            if params:
                norms[name] = float(distributed.full_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        return norms

    def prepare_for_distributed_training(self, strategy: str) -> None:
        self._runtime["student"] = distributed.wrap(self.student, self.teacher, strategy)
