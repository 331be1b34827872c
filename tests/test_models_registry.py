"""Registry-driven tests: every registered name is built, run forward and backward, and checked.

Registering a model is enough to get it tested here (no second list of names).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from gpfm_engine.errors import GpfmError
from gpfm_engine.models import IMAGENET_MEAN, build_model, get_model_cfg, list_models


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_no_nan(name):
    """The real width, heads and patch size; 2x2 tokens and at most 2 blocks keep ViT-L cheap on CPU
    (the full-depth structure is built on the meta device, which costs nothing)."""
    cfg = get_model_cfg(name)
    patch, width = cfg.arch["patch_size"], cfg.arch["embed_dim"]
    with torch.device("meta"):
        full = build_model(name)
    assert len(full.blocks) == cfg.arch["depth"] and full.embed_dim == width
    model = build_model(name, img_size=2 * patch, depth=min(cfg.arch["depth"], 2)).train()
    x = torch.randn(2, 3, 2 * patch, 2 * patch, generator=torch.Generator().manual_seed(0))
    masks = torch.tensor([[True, False, False, True], [False] * 4])
    out = model.forward_features(x, masks)
    assert out["x_norm_clstoken"].shape == (2, width)
    assert out["x_norm_patchtokens"].shape == (2, 4, width)
    # The feature (forward) as well: a pooling head after the tokens (CONCH) must get gradients too.
    loss = out["x_norm_clstoken"].square().mean() + out["x_norm_patchtokens"].square().mean() + model(x).square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (2, cfg.feature_dim) and torch.isfinite(feats).all()


@pytest.mark.parametrize("name", list_models())
def test_cfg_carries_preprocessing_and_sources(name):
    cfg = get_model_cfg(name)
    assert cfg.input_size % cfg.arch["patch_size"] == 0 and cfg.interpolation == "bicubic"
    assert len(cfg.mean) == len(cfg.std) == 3 and cfg.fov_um > 0 and cfg.license
    assert cfg.weights_env and (cfg.hf_repo or cfg.packaged_weights)
    # feature_dim == the width forward() returns at full width: checked in test_forward_backward_no_nan.
    json.dumps(cfg.to_dict())  # recipes store it


def test_gpfm_cfg_is_the_published_architecture():
    cfg = get_model_cfg("gpfm")
    assert cfg.arch == dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                            init_values=1e-5, num_register_tokens=0, ln_eps=1e-6)
    assert (cfg.input_size, cfg.fov_um, cfg.mean) == (224, 128.0, IMAGENET_MEAN)
    assert get_model_cfg("uni").arch["patch_size"] == 16
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model("gpfm").parameters())
    assert math.isclose(n / 1e6, 303.2, abs_tol=0.5)  # research/gpfm.md §1.1, mask_token included


def test_none_overrides_keep_defaults_and_unknown_names_list_the_registry():
    with torch.device("meta"):
        assert build_model("gpfm-tiny", depth=None, drop_path_rate=None).embed_dim == 192
    with pytest.raises(GpfmError, match="unknown model 'gpfm-huge'.*conch, gpfm, gpfm-tiny, phikon, uni"):
        get_model_cfg("gpfm-huge")
    assert list_models("gpfm*") == ["gpfm", "gpfm-tiny"]
