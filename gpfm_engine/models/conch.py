"""CONCH's vision tower (MahmoodLab/CONCH): a timm ViT-B/16 trunk at 448 px plus CoCa's contrastive pooler.

Upstream (``conch/open_clip_custom``, ``model_configs/conch_ViT-B-16.json``): the trunk is timm
``VisionTransformer(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16,
num_classes=0, dynamic_img_size=True)`` whose ``forward`` is ``forward_features`` (all tokens after
the final LayerNorm, eps 1e-6, no LayerScale). ``VisualModel`` then pools them with
``AttentionalPooler(d_model=512, context_dim=768, n_head=8, n_queries=1)`` (LayerNorms ``ln_k`` on
the tokens and ``ln_q`` on the learned query, eps 1e-5, then ``nn.MultiheadAttention`` with
kdim = vdim = 768), ``ln_contrast`` and ``@ proj_contrast`` (512x512, no bias). Checkpoint keys:
``visual.trunk.*`` (timm names, which are ours), ``visual.attn_pool_contrast.*``,
``visual.ln_contrast.*``, ``visual.proj_contrast``; the caption pooler, the text towers and
``logit_scale`` are not part of the image embedding and are dropped. Preprocessing: OpenAI CLIP
mean/std (``constants.py``), 448 px; TRIDENT reads 512 px at 20x for it (256 um field of view).

Output used by GPFM's distillation (research/gpfm.md §3.1, ``fms.py`` ``class CONCH``): the
**projected, L2-normalised 512-d image embedding** (attention pool -> ``ln_contrast`` ->
``proj_contrast`` -> ``F.normalize``), CONCH's ``encode_image`` default. That is ``forward`` here
and the model's feature (``feature_dim`` 512). It is the only CONCH output aligned with text, which
is why GPFM took CONCH as an expert (its VQA strength); the trunk's tokens (768-d, from the
inherited ``forward_features``) are not an image-text embedding, and GPFM distils no CONCH patch
tokens (``CONCH_patch_ratio`` is configured but unused). The trunk is our ViT, so pos-embed
resampling follows timm's ``dynamic_img_size`` (size-based bicubic with antialias): GPFM fed CONCH
its 224 px global crops, which timm resampled from the 28x28 grid to 14x14 exactly this way.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gpfm_engine.models.registry import ModelCfg, register_model
from gpfm_engine.models.vit import TRAINING_ONLY_KEYS, VisionTransformer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AttentionalPool(nn.Module):
    """Learned queries cross-attending to LayerNormed tokens (CoCa's attentional pooler).

    Parameter names are upstream's (``query``, ``attn.{q,k,v}_proj_weight``, ``attn.in_proj_bias``,
    ``attn.out_proj``, ``ln_q``, ``ln_k``) so its weights load without renaming.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, num_queries: int = 1, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=ln_eps)
        self.ln_k = nn.LayerNorm(context_dim, eps=ln_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L, context_dim] -> [N, num_queries, dim]."""
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class ConchVisionTower(VisionTransformer):
    """The CONCH trunk (inherited ViT: ``forward_features`` gives its tokens) with the contrastive head.

    ``forward`` -> the L2-normalised 512-d image embedding (see the module docstring for why that,
    and not the trunk's CLS token, is the distillation target).
    """

    def __init__(self, contrast_dim: int = 512, pool_heads: int = 8, pool_ln_eps: float = 1e-5, **vit_kwargs: Any) -> None:
        super().__init__(**vit_kwargs)
        self.attn_pool_contrast = AttentionalPool(contrast_dim, self.embed_dim, pool_heads, 1, pool_ln_eps)
        self.ln_contrast = nn.LayerNorm(contrast_dim, eps=pool_ln_eps)
        self.proj_contrast = nn.Parameter(torch.randn(contrast_dim, contrast_dim) * self.embed_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward_features(x)
        tokens = torch.cat((out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]), dim=1)
        pooled = self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])
        return F.normalize(pooled @ self.proj_contrast, dim=-1)


_KEEP = {"visual.trunk.": "", "visual.attn_pool_contrast.": "attn_pool_contrast.",
         "visual.ln_contrast.": "ln_contrast.", "visual.proj_contrast": "proj_contrast"}
_DROP = ("visual.attn_pool_caption.", "visual.ln_caption.", "text.", "text_decoder.", "logit_scale")


def convert_conch_checkpoint(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The full CoCa checkpoint (optionally under ``state_dict`` / with DDP's ``module.``) -> our names.

    Keys outside the image-embedding path are dropped; keys that are neither kept nor dropped pass
    through unchanged, so a vision-only file already in our names loads too and anything else is
    named by the strict loader.
    """
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    out: dict[str, torch.Tensor] = {}
    coca = False
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.startswith(_DROP):
            coca = True
            continue
        prefix = next((p for p in _KEEP if key.startswith(p)), None)
        coca |= prefix is not None
        out[_KEEP[prefix] + key[len(prefix):] if prefix else key] = value
    return out, "conch-coca" if coca else "flat"


@register_model
def conch() -> ModelCfg:
    return ModelCfg(
        name="conch", builder=ConchVisionTower, convert=convert_conch_checkpoint,
        # interpolate_offset 0 + antialias: timm's resample_abs_pos_embed (size-based bicubic, antialias=True).
        arch=dict(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                  init_values=None, num_register_tokens=0, ln_eps=1e-6, interpolate_offset=0.0,
                  interpolate_antialias=True, contrast_dim=512, pool_heads=8),
        feature_dim=512, input_size=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, fov_um=256.0,
        weights_env="GPFM_CONCH_WEIGHTS", hf_repo="MahmoodLab/conch", hf_filename="pytorch_model.bin",
        optional_keys=TRAINING_ONLY_KEYS,
        license="CC-BY-NC-ND-4.0 (gated on Hugging Face; accept the terms there first)",
        description="CONCH (Lu et al., Nat. Med. 2024) vision tower: ViT-B/16 at 448 px + CoCa attentional pooler; "
                    "feature = L2-normalised 512-d image-text embedding (GPFM's CONCH distillation target).")


__all__ = ["AttentionalPool", "ConchVisionTower", "convert_conch_checkpoint", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
