"""Phikon (owkin/phikon): an iBOT ViT-B/16 published as a Hugging Face ``ViTModel``, run by our ViT.

Architecture (the checkpoint's ``config.json``: hidden 768, 12 layers, 12 heads, intermediate 3072,
``gelu``, patch 16, image 224, ``qkv_bias`` true): a pre-norm ViT without LayerScale and without
registers, which is :class:`~gpfm_engine.models.vit.VisionTransformer` with ``init_values=None``.
Only the parameter names differ: transformers keeps query/key/value as three linears, we keep one
``qkv`` linear, so the converter concatenates them in q, k, v order (the order our ``Attention``
splits). ``layer_norm_eps`` is 1e-12 in the config GPFM's ``from_pretrained`` read (a later Hub pull
request proposes timm's 1e-6; the difference is far below fp32 noise for unit-variance tokens).

Output used by GPFM's distillation (research/gpfm.md §3.1, ``fms.py`` ``class Phikon``):
``last_hidden_state`` of ``ViTModel(add_pooling_layer=False)``, i.e. every token after the final
LayerNorm: CLS (768-d) as the CLS target and the 14x14 patch tokens as the patch target. Those are
exactly our ``forward_features`` ``x_norm_clstoken`` / ``x_norm_patchtokens``; the pooler
(``tanh(dense(CLS))``) is not used by anyone and its weights are dropped.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from gpfm_engine.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelCfg, register_model
from gpfm_engine.models.vit import TRAINING_ONLY_KEYS, VisionTransformer

# Both transformers layouts: the one the Hub file was saved in (<= 4.x, ``encoder.layer.<i>``) and
# the one transformers 5 writes (``layers.<i>``, ``q_proj``...). Block module path -> our module path.
_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_MODULES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
_QKV_MODULES = {
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_UNUSED_PREFIXES = ("pooler.",)  # ViTModel's tanh pooler: GPFM loads with add_pooling_layer=False


def convert_hf_vit_checkpoint(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """transformers ``ViTModel`` weights (either naming generation) -> our ViT names.

    q, k and v of a block are fused only when all three are present; a partial set keeps its
    original names so the strict loader names both the strays and the missing ``qkv``.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, tuple[str, torch.Tensor]]] = {}
    legacy = False
    for key, value in obj.items():
        key = key.removeprefix("vit.")  # task models (ViTFor...) nest the backbone under ``vit.``
        if key.startswith(_UNUSED_PREFIXES):
            continue
        legacy |= key.startswith("encoder.layer.")
        if key in _EMBEDDINGS:
            out[_EMBEDDINGS[key]] = value
        elif key == "embeddings.mask_token":  # [1, 1, D] in transformers, [1, D] here
            out["mask_token"] = value.reshape(1, -1)
        elif (m := _BLOCK.match(key)) and m[2] in _BLOCK_MODULES:
            out[f"blocks.{m[1]}.{_BLOCK_MODULES[m[2]]}.{m[3]}"] = value
        elif m and m[2] in _QKV_MODULES:
            qkv.setdefault((int(m[1]), m[3]), {})[_QKV_MODULES[m[2]]] = (key, value)
        else:
            out[key] = value  # unknown: the strict loader reports it
    for (block, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts[i][1] for i in range(3)])
        else:
            out.update(parts.values())
    return out, "hf-vit" + ("-legacy" if legacy else "")


@register_model
def phikon() -> ModelCfg:
    return ModelCfg(
        name="phikon", builder=VisionTransformer, convert=convert_hf_vit_checkpoint,
        arch=dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                  init_values=None, num_register_tokens=0, ln_eps=1e-12,
                  interpolate_offset=0.0),  # other sizes as transformers' interpolate_pos_encoding (size-based bicubic)
        feature_dim=768, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, fov_um=112.0,
        weights_env="GPFM_PHIKON_WEIGHTS", hf_repo="owkin/phikon", hf_filename="pytorch_model.bin",
        optional_keys=TRAINING_ONLY_KEYS,
        license="Owkin non-commercial licence (see the owkin/phikon model card)",
        description="Phikon (Filiot et al. 2023): iBOT ViT-B/16 on TCGA, 224 px at 20x (0.5 um/px), ImageNet "
                    "normalisation; feature = CLS after the final LayerNorm. One of GPFM's three experts.")


__all__ = ["convert_hf_vit_checkpoint"]
