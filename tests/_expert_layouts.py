"""Tiny expert checkpoints in their upstream key layouts, reference math, and registry stand-ins.

The layouts are written here from the upstream sources, not from our converters:
- Phikon: transformers ``ViTModel`` as saved by transformers 4.x (the Hub file), i.e.
  ``encoder.layer.<i>.attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``, ``layernorm_before/after``, plus ``pooler.dense``;
  transformers 5 itself renames these on ``from_pretrained``, which the tests use as a cross-check.
- CONCH: the CoCa checkpoint (``conch/open_clip_custom``): ``visual.trunk.*`` (timm ViT),
  ``visual.attn_pool_contrast.*`` (``nn.MultiheadAttention`` with kdim != d_model: separate
  ``{q,k,v}_proj_weight`` and one ``in_proj_bias``), ``visual.ln_contrast``, ``visual.proj_contrast``,
  the caption pooler, text towers and ``logit_scale``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _model_utils import randomize
from transformers import ViTConfig, ViTModel

from gpfm_engine.models import build_model, get_model_cfg, registry

# Per expert: the tiny stand-in's architecture (same family, same key names, small width/depth).
TINY_ARCH = {
    "uni": dict(embed_dim=32, depth=1, num_heads=2),
    "phikon": dict(embed_dim=48, depth=2, num_heads=3),
    "conch": dict(embed_dim=32, depth=2, num_heads=2, contrast_dim=24, pool_heads=2),
}

_LEGACY_VIT = [(r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
               (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
               (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
               (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
               (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
               (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
               (r"^layers\.(\d+)\.", r"encoder.layer.\1.")]


def vit_config(arch: dict) -> ViTConfig:
    """The transformers config of a Phikon-family arch (Phikon's own config.json at full size)."""
    return ViTConfig(hidden_size=arch["embed_dim"], num_hidden_layers=arch["depth"], num_attention_heads=arch["num_heads"],
                     intermediate_size=int(arch["embed_dim"] * arch["mlp_ratio"]), image_size=arch["img_size"],
                     patch_size=arch["patch_size"], layer_norm_eps=arch["ln_eps"], qkv_bias=True, hidden_act="gelu")


def hf_vit(arch: dict, seed: int = 0) -> ViTModel:
    """A randomly weighted transformers ViTModel with its pooler (the Hub file carries one)."""
    torch.manual_seed(seed)
    return randomize(ViTModel(vit_config(arch), add_pooling_layer=True), seed).eval()


def to_legacy_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 ViT names -> the 4.x names the Phikon Hub file uses."""
    out = {}
    for k, v in sd.items():
        for pattern, repl in _LEGACY_VIT:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        out[k] = v
    return out


def conch_upstream_state(arch: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CoCa weights under upstream names and shapes for a CONCH-family arch."""
    g = torch.Generator().manual_seed(seed)
    d, c, p = arch["embed_dim"], arch["contrast_dim"], arch["patch_size"]
    grid = arch["img_size"] // p
    hidden = int(d * arch["mlp_ratio"])

    def w(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    def ln(prefix: str, n: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.rand(n, generator=g) + 0.5, f"{prefix}.bias": w(n)}

    t = "visual.trunk."
    sd = {t + "cls_token": w(1, 1, d, scale=0.5), t + "pos_embed": w(1, 1 + grid * grid, d, scale=0.5),
          t + "patch_embed.proj.weight": w(d, 3, p, p, scale=0.05), t + "patch_embed.proj.bias": w(d), **ln(t + "norm", d)}
    for i in range(arch["depth"]):
        b = f"{t}blocks.{i}."
        sd |= {**ln(b + "norm1", d), **ln(b + "norm2", d), b + "attn.qkv.weight": w(3 * d, d), b + "attn.qkv.bias": w(3 * d),
               b + "attn.proj.weight": w(d, d), b + "attn.proj.bias": w(d), b + "mlp.fc1.weight": w(hidden, d),
               b + "mlp.fc1.bias": w(hidden), b + "mlp.fc2.weight": w(d, hidden), b + "mlp.fc2.bias": w(d)}
    a = "visual.attn_pool_contrast."
    sd |= {a + "query": w(1, c, scale=1.0), a + "attn.q_proj_weight": w(c, c), a + "attn.k_proj_weight": w(c, d),
           a + "attn.v_proj_weight": w(c, d), a + "attn.in_proj_bias": w(3 * c), a + "attn.out_proj.weight": w(c, c),
           a + "attn.out_proj.bias": w(c), **ln(a + "ln_q", c), **ln(a + "ln_k", d), **ln("visual.ln_contrast", c),
           "visual.proj_contrast": w(c, c, scale=d ** -0.5)}
    cap = "visual.attn_pool_caption."  # caption pooler: d_model == context dim, so a packed in_proj_weight
    sd |= {cap + "query": w(4, d), cap + "attn.in_proj_weight": w(3 * d, d), cap + "attn.in_proj_bias": w(3 * d),
           cap + "attn.out_proj.weight": w(d, d), cap + "attn.out_proj.bias": w(d), **ln(cap + "ln_q", d),
           **ln(cap + "ln_k", d), **ln("visual.ln_caption", d), "text.token_embedding.weight": w(11, d),
           "text.text_projection": w(d, c), "text_decoder.ln_final.weight": w(d), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    return sd


def _ln(x: torch.Tensor, sd: dict, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    n, lq, c = q.shape
    h = c // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, -1, heads, h).transpose(1, 2)

    a = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(h)).softmax(-1)
    return (a @ split(v)).transpose(1, 2).reshape(n, lq, c)


def conch_reference(sd: dict, x: torch.Tensor, arch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-op CONCH image embedding from upstream weights: (normalised embedding, trunk tokens).

    timm trunk (pos-embed resampled as timm's ``resample_abs_pos_embed``: size-based bicubic with
    antialias), then ``AttentionalPooler`` -> ``ln_contrast`` -> ``@ proj_contrast`` -> L2 norm.
    """
    t, p = "visual.trunk.", arch["patch_size"]
    n = x.shape[0]
    tok = F.conv2d(x, sd[t + "patch_embed.proj.weight"], sd[t + "patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    pos = sd[t + "pos_embed"]
    g, gh, gw = math.isqrt(pos.shape[1] - 1), x.shape[-2] // p, x.shape[-1] // p
    grid = pos[:, 1:]
    if (gh, gw) != (g, g):
        grid = F.interpolate(grid.reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic", antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    tok = torch.cat([sd[t + "cls_token"].expand(n, -1, -1), tok], 1) + torch.cat([pos[:, :1], grid], 1)
    for i in range(arch["depth"]):
        b = f"{t}blocks.{i}."
        q, k, v = F.linear(_ln(tok, sd, b + "norm1", 1e-6), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        tok = tok + F.linear(_attention(q, k, v, arch["num_heads"]), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        y = F.gelu(F.linear(_ln(tok, sd, b + "norm2", 1e-6), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        tok = tok + F.linear(y, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    tok = _ln(tok, sd, t + "norm", 1e-6)
    a = "visual.attn_pool_contrast."
    kv = _ln(tok, sd, a + "ln_k", 1e-5)
    q = _ln(sd[a + "query"], sd, a + "ln_q", 1e-5).expand(n, -1, -1)
    bq, bk, bv = sd[a + "attn.in_proj_bias"].chunk(3)
    o = _attention(F.linear(q, sd[a + "attn.q_proj_weight"], bq), F.linear(kv, sd[a + "attn.k_proj_weight"], bk),
                   F.linear(kv, sd[a + "attn.v_proj_weight"], bv), arch["pool_heads"])
    o = F.linear(o, sd[a + "attn.out_proj.weight"], sd[a + "attn.out_proj.bias"])[:, 0]
    return F.normalize(_ln(o, sd, "visual.ln_contrast", 1e-5) @ sd["visual.proj_contrast"], dim=-1), tok


def use_tiny_arch(monkeypatch: pytest.MonkeyPatch, name: str, **arch: object) -> dict:
    """Swap a registered expert's architecture for a tiny one (same builder, converter and sources)."""
    cfg = get_model_cfg(name)
    tiny_arch = dict(cfg.arch) | TINY_ARCH[name] | arch
    feature_dim = tiny_arch.get("contrast_dim", tiny_arch["embed_dim"])  # CONCH's feature is its projection
    tiny = dataclasses.replace(cfg, arch=tiny_arch, feature_dim=feature_dim)
    monkeypatch.setitem(registry._REGISTRY, name, tiny)
    return dict(tiny.arch)


def write_upstream_weights(name: str, arch: dict, folder: Path, seed: int = 0) -> Path:
    """A tiny checkpoint of ``name`` in the file layout its publisher ships."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.bin"
    if name == "phikon":
        torch.save(to_legacy_vit(hf_vit(arch, seed).state_dict()), path)
    elif name == "conch":
        torch.save(conch_upstream_state(arch, seed), path)
    else:  # UNI: a flat timm state dict, which are our ViT names
        sd = randomize(build_model(name), seed).state_dict()
        torch.save({k: v for k, v in sd.items() if k != "mask_token"}, path)
    return path


def tiny_experts_from_env(monkeypatch: pytest.MonkeyPatch, folder: Path, names: list[str], **arch: object) -> dict[str, dict]:
    """Tiny stand-ins for ``names`` whose weights are found through each model's environment variable."""
    archs = {}
    for name in names:
        archs[name] = use_tiny_arch(monkeypatch, name, **arch)
        monkeypatch.setenv(get_model_cfg(name).weights_env, str(write_upstream_weights(name, archs[name], folder)))
    return archs
