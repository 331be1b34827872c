"""The DINOv2-style Vision Transformer family: blocks, the model, checkpoint converters, variants.

One family, one file (timm's habit): everything that makes a ViT variant — its layers, how its
published checkpoints are renamed into our parameter names, and its registry entries with their
preprocessing — can be found by reading this file top to bottom. Parameter names follow DINOv2
(``blocks.<i>.attn.qkv``, ``ls1.gamma``, ``register_tokens``, ``mask_token``), which are also timm's
names, so the flat GPFM/UNI files load without renaming.
"""
from __future__ import annotations

import logging
import math
import re
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gpfm_engine.models.registry import ModelCfg, register_model

log = logging.getLogger(__name__)


# --- blocks ----------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens with one strided convolution (``proj``, as DINOv2/timm)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            # DINOv2 refuses too: silently dropping border pixels would change the features.
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, gh, gw] -> [B, gh*gw, C]


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    SDPA picks flash / memory-efficient kernels on GPU and exports to ONNX as
    MatMul-Softmax-MatMul with the scale applied to q first, which TensorRT fuses.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT/DINOv2); ``gamma`` starts at ``init_values``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact-erf GELU -> fc2, the FFN GPFM uses (``ffn_layer='mlp'``, not SwiGLU)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample: drops a residual branch for a random subset of the batch."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float | None, ln_eps: float,
                 drop_path: float, qkv_bias: bool, proj_bias: bool, ffn_bias: bool) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=ln_eps)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


# --- the model -------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """DINOv2 ViT backbone: normalized float NCHW -> CLS token after the final LayerNorm, [N, D].

    ``img_size`` is the size the learned position embeddings are laid out for; other sizes that are
    multiples of the patch size (the trainer's 98 px local crops) get a bicubically interpolated
    pos-embed, computed the way DINOv2 does it (``interpolate_offset`` 0.1, no antialias), so
    weights trained with DINOv2 code behave the same here at every size.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0, init_values: float | None = 1e-5,
                 num_register_tokens: int = 0, ln_eps: float = 1e-6, drop_path_rate: float = 0.0,
                 drop_path_uniform: bool = False, qkv_bias: bool = True, proj_bias: bool = True,
                 ffn_bias: bool = True, interpolate_offset: float = 0.1, interpolate_antialias: bool = False) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # Linear decay 0 -> rate over depth (DINOv2's default) or uniform (GPFM's run config).
        rates = [drop_path_rate if drop_path_uniform else drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, init_values, ln_eps, rates[i], qkv_bias, proj_bias, ffn_bias)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's initialisation: truncated normal 0.02 for pos-embed and linears, tiny CLS/registers."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- geometry ------------------------------------------------------------------------------

    @property
    def pos_grid(self) -> int:
        """Side of the square patch grid the stored pos-embed is laid out for."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def num_patches(self, h: int, w: int) -> int:
        """Patch tokens for an ``h`` x ``w`` input (both multiples of ``patch_size``)."""
        return (h // self.patch_size) * (w // self.patch_size)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """Pos-embed [1, 1+P, D] for an ``h`` x ``w`` input; the stored one when the grid matches.

        Bicubic in float32 as DINOv2 (``scale_factor = (grid + offset) / M``), because weights
        trained with that code were trained with exactly these embeddings at other crop sizes.
        """
        gh, gw = h // self.patch_size, w // self.patch_size
        m = self.pos_grid
        if gh == m and gw == m:
            return self.pos_embed
        pos = self.pos_embed.float()
        patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            kw: dict[str, Any] = {"scale_factor": ((gh + self.interpolate_offset) / m, (gw + self.interpolate_offset) / m)}
        else:
            kw = {"size": (gh, gw)}
        patch = F.interpolate(patch, mode="bicubic", antialias=self.interpolate_antialias, **kw)
        if patch.shape[-2:] != (gh, gw):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(patch.shape[-2:])}, wanted {(gh, gw)}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat((pos[:, :1], patch), dim=1).to(self.pos_embed.dtype)

    @torch.no_grad()
    def set_input_size(self, img_size: int) -> None:
        """Resample the stored pos-embed to ``img_size`` once, so that size runs with no interpolation.

        Used by the ONNX export, which must see a constant pos-embed (an exported bicubic Resize
        differs between exporters and runtimes, see research/gpu.md §2.2).
        """
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {self.patch_size}")
        self.pos_embed = nn.Parameter(self.interpolate_pos_encoding(img_size, img_size).detach().clone())
        self.img_size = img_size

    # -- forward --------------------------------------------------------------------------------

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (masked ones replaced by ``mask_token``) + CLS, pos-embed, then registers."""
        h, w = x.shape[-2:]
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """All token outputs under DINOv2's names; ``masks`` is [N, P] bool (iBOT)."""
        tokens = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : r + 1],
            "x_norm_patchtokens": normed[:, r + 1 :],
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feature: the CLS token after the final norm (the head is Identity)."""
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    def no_weight_decay(self) -> set[str]:
        """Parameters DINOv2 trains without weight decay (embeddings and tokens)."""
        return {"pos_embed", "cls_token", "register_tokens", "mask_token"}


# --- checkpoint converters -------------------------------------------------------------------------

# Keys of the training-time model that inference weights may omit: iBOT's mask token.
TRAINING_ONLY_KEYS = frozenset({"mask_token"})
_HEAD_PREFIXES = ("dino_head.", "ibot_head.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def convert_dinov2_checkpoint(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Turn either GPFM layout into our flat parameter names; returns (state_dict, layout name).

    The layout is told by structure, not guessed from weight names: the GitHub release is a
    DINOv2 teacher checkpoint ``{'teacher': {'backbone.…', 'dino_head.…'}}`` with FSDP block chunks
    (``blocks.<chunk>.<idx>``); the Hugging Face file is already flat (timm names). Projection
    heads and ``mask_token`` are dropped (inference does not use them); anything else unknown is
    kept so the strict loader reports it.
    """
    if "teacher" in obj and isinstance(obj["teacher"], Mapping):
        ignored = sorted(k for k in obj if k != "teacher")
        if ignored:
            log.debug("release checkpoint: ignoring top-level entries %s", ignored)
        sd, layout = obj["teacher"], "dinov2-release"
    else:
        sd, layout = obj, "flat"
    out: dict[str, torch.Tensor] = {}
    chunked = False
    for key, value in sd.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        if key.startswith(_HEAD_PREFIXES) or key in TRAINING_ONLY_KEYS:
            continue
        flat = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)
        chunked |= flat != key
        out[flat] = value
    return out, layout + ("+chunked" if chunked else "")


# --- variants (the registry entries) ---------------------------------------------------------------


def _arch(**overrides: Any) -> dict[str, Any]:
    """DINOv2 ViT-L/14 defaults (GPFM's builder call) with a variant's differences merged over."""
    base = dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                init_values=1e-5, num_register_tokens=0, ln_eps=1e-6)
    return base | overrides


_VIT = dict(builder=VisionTransformer, convert=convert_dinov2_checkpoint, optional_keys=TRAINING_ONLY_KEYS)


@register_model
def gpfm() -> ModelCfg:
    return ModelCfg(
        name="gpfm", arch=_arch(), feature_dim=1024, fov_um=128.0, weights_env="GPFM_WEIGHTS",
        hf_repo="majiabo/GPFM", hf_filename="GPFM.pth",
        license="CC-BY-NC-ND-4.0 (GPFM repository LICENSE; the Hugging Face card is reported as MIT — check before redistributing)",
        description="GPFM (Ma et al., Nat. Biomed. Eng. 2025): DINOv2 ViT-L/14 distilled from UNI, Phikon and CONCH; "
                    "feature = CLS after the final norm. Authors' preprocessing: 512 px at 40x (128 um) resized to 224.",
        **_VIT)


@register_model
def uni() -> ModelCfg:
    return ModelCfg(
        name="uni", arch=_arch(patch_size=16), feature_dim=1024, fov_um=112.0, weights_env="GPFM_UNI_WEIGHTS",
        hf_repo="MahmoodLab/UNI", hf_filename="pytorch_model.bin",
        license="CC-BY-NC-ND-4.0 (gated on Hugging Face; accept the terms there first)",
        description="UNI (Chen et al., Nat. Med. 2024): ViT-L/16 DINOv2, 224 px at 20x (0.5 um/px); GPFM's main expert.",
        **_VIT)


@register_model
def gpfm_tiny() -> ModelCfg:
    # Patch 14 like GPFM: 224 px gives the teacher's 16x16 token grid and the 98 px local crops
    # divide evenly (7x7). Depth 6 keeps fp32 safetensors at about 11 MB (limit 12 MB) and CPU
    # training within the trainer's hour.
    return ModelCfg(
        name="gpfm-tiny", arch=_arch(embed_dim=192, depth=6, num_heads=3), feature_dim=192, fov_um=128.0,
        weights_env="GPFM_TINY_WEIGHTS", packaged_weights="gpfm-tiny.safetensors",
        license="Apache-2.0 (demo weights trained by training/ on the slides in ../shared/data)",
        description="gpfm-tiny: a small ViT/14 student self-distilled on CPU as an offline demo; it is not GPFM.",
        **_VIT)


__all__ = ["VisionTransformer", "Block", "Attention", "LayerScale", "Mlp", "PatchEmbed", "DropPath",
           "convert_dinov2_checkpoint", "TRAINING_ONLY_KEYS"]
