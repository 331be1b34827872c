"""Helpers shared by the model/weights/backend tests: non-trivial random weights, HF key mapping.

Reference implementation: transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``. timm's
``vit_large_patch14_dinov2`` would be the other natural reference, but timm imports torchvision at
import time and PyPI's torchvision fails to load beside the CPU build torch 2.13.0 ("operator
torchvision::nms does not exist"), so it is not installed; transformers needs no torchvision.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a value that matters (LayerScale ~1, not 1e-5; non-trivial norms/tokens).

    With DINOv2's init (LayerScale 1e-5), the blocks barely touch the residual stream and two
    implementations could differ inside the blocks without the output showing it.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gamma") or (name.endswith("weight") and p.ndim == 1):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif p.ndim == 1 or "token" in name or "pos_embed" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def to_hf_dinov2(sd: dict[str, torch.Tensor], depth: int, dim: int) -> dict[str, torch.Tensor]:
    """Our (DINOv2/timm) parameter names -> transformers' Dinov2Model names (qkv split into q, k, v)."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        pairs = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
                 ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
        for a, b in pairs:
            for t in ("weight", "bias"):
                out[f"{theirs}{b}.{t}"] = sd[f"{ours}{a}.{t}"]
        for j, n in enumerate("qkv"):
            out[f"{theirs}attention.{n}_proj.weight"] = sd[f"{ours}attn.qkv.weight"][j * dim:(j + 1) * dim]
            out[f"{theirs}attention.{n}_proj.bias"] = sd[f"{ours}attn.qkv.bias"][j * dim:(j + 1) * dim]
        out[f"{theirs}layer_scale1.lambda1"] = sd[f"{ours}ls1.gamma"]
        out[f"{theirs}layer_scale2.lambda1"] = sd[f"{ours}ls2.gamma"]
    return out


def release_layout(sd: dict[str, torch.Tensor], chunks: int) -> dict[str, object]:
    """Rewrite a flat state dict as GPFM's GitHub release: {'teacher': backbone.* chunked + dino_head.*}."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per_chunk = depth // chunks
    teacher: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // per_chunk}.{i}." + k.split(".", 2)[2]
        teacher["backbone." + k] = v
    g = torch.Generator().manual_seed(1)
    for name, shape in (("mlp.0.weight", (16, 8)), ("mlp.0.bias", (16,)), ("last_layer.weight_g", (32, 1)),
                        ("last_layer.weight_v", (32, 8))):
        teacher["dino_head." + name] = torch.randn(shape, generator=g)
    return {"teacher": teacher}
