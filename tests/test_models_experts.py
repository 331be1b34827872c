"""GPFM's other experts, Phikon and CONCH's vision tower: upstream layouts load strictly and match references.

Tolerance: max |difference| <= 1e-5 in fp32 (tokens and features), on random non-trivial weights.
Phikon's reference is transformers' own ``ViTModel`` loading the Hub-layout file; CONCH's is plain
tensor math written from the upstream code (timm and open_clip are not installed here).
"""
from __future__ import annotations

import pytest
import torch
from _expert_layouts import (conch_reference, conch_upstream_state, hf_vit, to_legacy_vit, use_tiny_arch,
                             vit_config)
from safetensors.torch import save_file
from transformers import ViTModel

from gpfm_engine.errors import WeightsError
from gpfm_engine.models import get_model_cfg, load_model
from gpfm_engine.models.conch import OPENAI_CLIP_MEAN

TOL = 1e-5


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    for name in ("GPFM_PHIKON_WEIGHTS", "GPFM_CONCH_WEIGHTS", "GPFM_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def _x(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


# --- Phikon ---------------------------------------------------------------------------------------


@pytest.fixture
def phikon_files(monkeypatch, tmp_path):
    """A tiny Phikon in the Hub layout (config.json + 4.x names + pooler) and in transformers 5 names."""
    arch = use_tiny_arch(monkeypatch, "phikon", img_size=64)
    ref = hf_vit(arch, seed=1)
    hub = tmp_path / "hub"
    vit_config(arch).save_pretrained(hub)
    torch.save(to_legacy_vit(ref.state_dict()), hub / "pytorch_model.bin")
    v5 = tmp_path / "v5.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(v5))
    return hub, v5, ref


def test_phikon_hub_layout_matches_transformers(phikon_files):
    hub, v5, ref = phikon_files
    legacy = torch.load(hub / "pytorch_model.bin", weights_only=True)
    assert "encoder.layer.1.attention.attention.query.weight" in legacy and "pooler.dense.weight" in legacy
    # transformers' own reading of the Hub layout (as GPFM loads Phikon) is the reference
    hf = ViTModel.from_pretrained(hub, add_pooling_layer=False).eval()
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in ref.state_dict().items() if not k.startswith("pooler."))
    x = _x(64)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
    for path, layout in ((hub / "pytorch_model.bin", "hf-vit-legacy"), (v5, "hf-vit")):
        model = load_model("phikon", weights=path)
        assert model.weights_layout == layout and not model.training
        with torch.no_grad():
            out = model.forward_features(x)
            assert (out["x_norm_clstoken"] - expected[:, 0]).abs().max() <= TOL
            assert (out["x_norm_patchtokens"] - expected[:, 1:]).abs().max() <= TOL
            assert torch.equal(model(x), out["x_norm_clstoken"])
    # another size: our pos-embed resampling is transformers' interpolate_pos_encoding
    small = _x(32)
    with torch.no_grad():
        expected = hf(pixel_values=small, interpolate_pos_encoding=True).last_hidden_state
        out = model.forward_features(small)
    assert (out["x_norm_clstoken"] - expected[:, 0]).abs().max() <= TOL
    assert (out["x_norm_patchtokens"] - expected[:, 1:]).abs().max() <= TOL


def test_phikon_partial_qkv_and_leftovers_are_named(phikon_files, tmp_path):
    hub, _, _ = phikon_files
    sd = torch.load(hub / "pytorch_model.bin", weights_only=True)
    del sd["encoder.layer.0.attention.attention.key.weight"]
    torch.save(sd, tmp_path / "broken.bin")
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.0\.attn\.qkv\.weight.*"
                                           r"unexpected keys: encoder\.layer\.0\.attention\.attention\.(query|value)\.weight"):
        load_model("phikon", weights=tmp_path / "broken.bin")


def test_phikon_cfg_is_the_published_architecture():
    cfg = get_model_cfg("phikon")
    with torch.device("meta"):
        model = cfg.build()
    assert (len(model.blocks), model.embed_dim, model.patch_size, model.img_size, cfg.feature_dim) == (12, 768, 16, 224, 768)
    assert not any("ls1" in k for k in model.state_dict())  # no LayerScale in Phikon's ViT
    assert (cfg.hf_repo, cfg.weights_env) == ("owkin/phikon", "GPFM_PHIKON_WEIGHTS")


# --- CONCH ----------------------------------------------------------------------------------------


@pytest.fixture
def conch_file(monkeypatch, tmp_path):
    arch = use_tiny_arch(monkeypatch, "conch", img_size=64)
    sd = conch_upstream_state(arch, seed=2)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    return path, sd, arch


@pytest.mark.parametrize("size", [64, 32])  # native grid, and the resampled pos-embed (GPFM's 224 px crops on 448)
def test_conch_matches_the_reference_math(conch_file, size):
    path, sd, arch = conch_file
    model = load_model("conch", weights=path)
    assert model.weights_layout == "conch-coca"
    x = _x(size)
    expected, tokens = conch_reference(sd, x, arch)
    with torch.no_grad():
        feats = model(x)
        out = model.forward_features(x)
    assert feats.shape == (2, arch["contrast_dim"]) and (feats - expected).abs().max() <= TOL
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2))
    assert (out["x_norm_clstoken"] - tokens[:, 0]).abs().max() <= TOL
    assert (out["x_norm_patchtokens"] - tokens[:, 1:]).abs().max() <= TOL


def test_conch_wrapped_and_prefixed_checkpoints_load(conch_file, tmp_path):
    path, sd, _ = conch_file
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    x = _x(64)
    with torch.no_grad():
        assert torch.equal(load_model("conch", weights=tmp_path / "ddp.pt")(x), load_model("conch", weights=path)(x))
    del sd["visual.proj_contrast"]
    sd["visual.attn_pool_contrast.attn.bogus"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.bin")
    with pytest.raises(WeightsError, match=r"missing keys: proj_contrast.*unexpected keys: attn_pool_contrast\.attn\.bogus"):
        load_model("conch", weights=tmp_path / "broken.bin")


def test_conch_cfg_is_the_published_architecture():
    cfg = get_model_cfg("conch")
    with torch.device("meta"):
        model = cfg.build()
    assert (len(model.blocks), model.embed_dim, model.patch_size, model.img_size) == (12, 768, 16, 448)
    assert model.pos_embed.shape == (1, 1 + 28 * 28, 768) and model.proj_contrast.shape == (512, 512)
    assert model.attn_pool_contrast.attn.k_proj_weight.shape == (512, 768) and model.attn_pool_contrast.attn.num_heads == 8
    assert (cfg.feature_dim, cfg.input_size, cfg.mean) == (512, 448, OPENAI_CLIP_MEAN)


@pytest.mark.parametrize("name,env", [("phikon", "GPFM_PHIKON_WEIGHTS"), ("conch", "GPFM_CONCH_WEIGHTS")])
def test_missing_weights_name_the_variable_and_the_hub_file(name, env):
    cfg = get_model_cfg(name)
    with pytest.raises(WeightsError, match=f"no weights found for model '{name}'.*set {env}=PATH.*{cfg.hf_repo}/{cfg.hf_filename}"):
        load_model(name)
