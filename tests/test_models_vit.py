"""The DINOv2 ViT against an independent implementation (transformers) with the same random weights.

Tolerance: max |difference| <= 1e-5 in fp32 on random images, for every token after the final norm.
"""
from __future__ import annotations

import pytest
import torch
from _model_utils import randomize, to_hf_dinov2
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from gpfm_engine.models import build_model, get_model_cfg
from gpfm_engine.models.vit import VisionTransformer

TOL = 1e-5


def _hf_pair(model: VisionTransformer, registers: bool = False):
    a = model.blocks[0].attn
    kw = dict(hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=a.num_heads,
              image_size=model.img_size, patch_size=model.patch_size, layer_norm_eps=model.norm.eps,
              mlp_ratio=model.blocks[0].mlp.fc1.out_features // model.embed_dim, layerscale_value=1e-5)
    if registers:
        hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=model.num_register_tokens, **kw))
    else:
        hf = Dinov2Model(Dinov2Config(**kw))
    hf.load_state_dict(to_hf_dinov2(model.state_dict(), len(model.blocks), model.embed_dim), strict=True)
    return hf.eval()


def _compare(model: VisionTransformer, hf, x: torch.Tensor, masks: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        ours = model.forward_features(x, masks)
        ref = hf(pixel_values=x, bool_masked_pos=masks).last_hidden_state
    r = model.num_register_tokens
    assert ours["x_norm_clstoken"].shape == (x.shape[0], model.embed_dim)
    assert (ours["x_norm_clstoken"] - ref[:, 0]).abs().max() <= TOL
    assert (ours["x_norm_patchtokens"] - ref[:, 1 + r:]).abs().max() <= TOL
    assert ours["x_norm_regtokens"].shape[1] == r
    if r:
        assert (ours["x_norm_regtokens"] - ref[:, 1:1 + r]).abs().max() <= TOL
    if masks is None:
        with torch.no_grad():
            assert torch.equal(model(x), ours["x_norm_clstoken"])


@pytest.fixture(scope="module")
def small() -> VisionTransformer:
    # interpolate_offset=0 selects size-based interpolation, which is what transformers implements.
    return randomize(VisionTransformer(img_size=56, patch_size=14, embed_dim=96, depth=3, num_heads=3,
                                       interpolate_offset=0.0)).eval()


def test_small_vit_matches_transformers_at_native_and_other_sizes(small):
    hf = _hf_pair(small)
    g = torch.Generator().manual_seed(0)
    _compare(small, hf, torch.randn(3, 3, 56, 56, generator=g))
    _compare(small, hf, torch.randn(2, 3, 98, 98, generator=g))  # the trainer's local crops: 7x7 tokens
    _compare(small, hf, torch.randn(2, 3, 112, 84, generator=g))  # non-square


def test_mask_token_replaces_masked_patches_like_transformers(small):
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, small.num_patches(56, 56), dtype=torch.bool)
    masks[0, :3] = True
    masks[1, 5:] = True
    _compare(small, _hf_pair(small), x, masks)
    with torch.no_grad():
        assert not torch.allclose(small(x), small.forward_features(x, masks)["x_norm_clstoken"])


def test_registers_match_transformers_dinov2_with_registers():
    model = randomize(VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2,
                                        num_register_tokens=4, interpolate_offset=0.0,
                                        interpolate_antialias=True), seed=3).eval()
    hf = _hf_pair(model, registers=True)
    g = torch.Generator().manual_seed(2)
    _compare(model, hf, torch.randn(2, 3, 56, 56, generator=g))
    _compare(model, hf, torch.randn(2, 3, 98, 98, generator=g))


def test_gpfm_architecture_matches_transformers_at_full_width():
    """The registered gpfm cfg (ViT-L/14 width, heads, eps, 224 px) with depth cut to 2 for speed."""
    model = randomize(build_model("gpfm", depth=2), seed=4).eval()
    assert (model.embed_dim, model.patch_size, model.blocks[0].attn.num_heads) == (1024, 14, 16)
    assert model.pos_embed.shape == (1, 257, 1024) and model.norm.eps == 1e-6
    _compare(model, _hf_pair(model), torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)))


def test_dinov2_interpolation_offset_gives_the_requested_grid():
    model = build_model("gpfm-tiny").eval()  # interpolate_offset=0.1 as DINOv2, which GPFM was trained with
    pe = model.interpolate_pos_encoding(98, 98)
    assert pe.shape == (1, 1 + 49, 192)
    assert model.interpolate_pos_encoding(224, 224) is model.pos_embed
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 98, 98))
    assert out["x_norm_patchtokens"].shape == (2, 49, 192) and out["x_prenorm"].shape == (2, 50, 192)


def test_set_input_size_bakes_the_interpolated_pos_embed():
    model = randomize(build_model("gpfm-tiny", img_size=112)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        model.set_input_size(224)
        assert model.pos_embed.shape == (1, 257, 192)
        assert model.interpolate_pos_encoding(224, 224) is model.pos_embed
        assert (model(x) - before).abs().max() <= TOL


def test_input_not_a_multiple_of_the_patch_size_is_refused():
    model = build_model("gpfm-tiny")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.randn(1, 3, 100, 100))


def test_drop_path_is_stochastic_in_training_and_off_in_eval():
    model = randomize(build_model("gpfm-tiny", drop_path_rate=0.5, drop_path_uniform=True))
    x = torch.randn(4, 3, 28, 28)
    torch.manual_seed(0)
    a = model.train()(x)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_tiny_cfg_fits_the_shipping_limit():
    """gpfm-tiny's fp32 safetensors must stay <= 12 MB (issue 6)."""
    with torch.device("meta"):
        model = build_model("gpfm-tiny")
    n = sum(p.numel() for p in model.parameters())
    assert n * 4 <= 12_000_000
    assert get_model_cfg("gpfm-tiny").feature_dim == model.embed_dim
