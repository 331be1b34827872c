"""Weights: both GPFM layouts, resolution order, strictness, unsafe and broken files."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from _model_utils import randomize, release_layout
from safetensors.torch import save_file

from gpfm_engine.errors import GpfmError, WeightsError
from gpfm_engine.models import build_model, get_model_cfg, load_model, resolve_weights, sha256_file
from gpfm_engine.models import weights as weights_mod
from gpfm_engine.models.vit import convert_dinov2_checkpoint

TINY = "gpfm-tiny"


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return randomize(build_model(TINY), seed=7).eval()


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory) -> dict[str, Path]:
    """The same weights in every layout we accept."""
    d = tmp_path_factory.mktemp("weights")
    sd = reference.state_dict()
    no_mask = {k: v for k, v in sd.items() if k != "mask_token"}
    out = {"safetensors": d / "tiny.safetensors", "hf_flat_pth": d / "GPFM.pth", "release_pth": d / "release.pth"}
    save_file(sd, str(out["safetensors"]))
    torch.save(no_mask, out["hf_flat_pth"])  # the Hugging Face file: flat timm names, no mask_token
    torch.save(release_layout(sd, chunks=2), out["release_pth"])  # {'teacher': backbone.blocks.<chunk>.<i>}
    return out


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No developer env vars, packaged files or HF cache leak into these tests."""
    for name in ("GPFM_WEIGHTS", "GPFM_UNI_WEIGHTS", "GPFM_TINY_WEIGHTS", "GPFM_ALLOW_DOWNLOAD", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(weights_mod, "PACKAGED_DIR", tmp_path / "packaged")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_all_layouts_load_strictly_and_give_identical_features(reference, files):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
    for kind, path in files.items():
        model = load_model(TINY, weights=path)
        with torch.no_grad():
            assert torch.equal(model(x), expected), kind
        assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert not model.training and model.weights_source == "argument"
    assert load_model(TINY, weights=files["release_pth"]).weights_layout == "dinov2-release+chunked"
    assert load_model(TINY, weights=files["hf_flat_pth"]).weights_layout == "flat"


def test_release_conversion_of_the_full_gpfm_key_set():
    """GPFM's release names (4 chunks of 6 blocks, dino_head, mask_token) map onto our ViT-L exactly."""
    with torch.device("meta"):
        model = build_model("gpfm")
    ours = model.state_dict()
    teacher = {}
    for k, v in ours.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m:
            k = f"blocks.{int(m[1]) // 6}.{m[1]}.{m[2]}"
        teacher[f"backbone.{k}"] = v
    teacher["dino_head.mlp.0.weight"] = torch.empty(2048, 1024, device="meta")
    assert "backbone.blocks.3.23.ls2.gamma" in teacher and "backbone.blocks.0.0.attn.qkv.weight" in teacher
    converted, layout = convert_dinov2_checkpoint({"teacher": teacher})
    assert layout == "dinov2-release+chunked"
    assert set(converted) == set(ours) - {"mask_token"}


def test_resolution_order_argument_env_packaged(files, monkeypatch, tmp_path):
    cfg = get_model_cfg(TINY)
    packaged = tmp_path / "packaged" / cfg.packaged_weights
    packaged.parent.mkdir()
    packaged.write_bytes(files["safetensors"].read_bytes())
    assert resolve_weights(cfg).source == "packaged"
    monkeypatch.setenv("GPFM_TINY_WEIGHTS", str(files["hf_flat_pth"]))
    assert resolve_weights(cfg) == weights_mod.ResolvedWeights(files["hf_flat_pth"], "env:GPFM_TINY_WEIGHTS")
    assert resolve_weights(cfg, files["release_pth"]).path == files["release_pth"]
    monkeypatch.setenv("GPFM_TINY_WEIGHTS", str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightsError, match=r"nope.safetensors: weights file not found \(from \$GPFM_TINY_WEIGHTS\)"):
        resolve_weights(cfg)


def _fake_hf_cache(root: Path, repo: str, filename: str, data: bytes) -> Path:
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("abc123")
    f = base / "snapshots" / "abc123" / filename
    f.parent.mkdir(parents=True)
    f.write_bytes(data)
    return f


def test_hugging_face_cache_first_download_only_when_allowed(files, monkeypatch, tmp_path):
    cfg = get_model_cfg("gpfm")
    calls = []

    def fake_download(repo, filename, **kw):
        calls.append((repo, filename))
        return str(files["hf_flat_pth"])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(WeightsError) as err:
        resolve_weights(cfg)
    assert calls == []  # offline by default
    msg = str(err.value)
    assert "\n" not in msg and "weights=PATH" in msg and "GPFM_WEIGHTS=PATH" in msg and "majiabo/GPFM" in msg
    assert "GPFM_ALLOW_DOWNLOAD=1" in msg
    assert resolve_weights(cfg, allow_download=True).source == "hf-download" and calls == [("majiabo/GPFM", "GPFM.pth")]
    monkeypatch.setenv("GPFM_ALLOW_DOWNLOAD", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError):
        resolve_weights(cfg)
    cached = _fake_hf_cache(tmp_path / "hf", "majiabo/GPFM", "GPFM.pth", b"x")
    assert resolve_weights(cfg) == weights_mod.ResolvedWeights(cached, "hf-cache")


def test_missing_packaged_tiny_weights_name_the_three_ways():
    with pytest.raises(WeightsError, match=r"no weights found for model 'gpfm-tiny'.*weights=PATH.*GPFM_TINY_WEIGHTS"
                                           r".*gpfm-tiny\.safetensors.*training\.export"):
        load_model(TINY)


def test_wrong_shapes_and_keys_are_named(reference, tmp_path):
    sd = reference.state_dict()
    bad = dict(sd)
    bad["pos_embed"] = torch.zeros(1, 197, 192)  # a /16 grid
    bad["head.weight"] = torch.zeros(3, 192)
    del bad["blocks.5.mlp.fc2.bias"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as err:
        load_model(TINY, weights=tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg and "missing keys: blocks.5.mlp.fc2.bias" in msg
    assert "unexpected keys: head.weight" in msg and "pos_embed (1, 197, 192) != (1, 257, 192)" in msg


def test_weights_of_another_model_are_refused(tmp_path):
    uni_like = build_model(TINY, patch_size=16).state_dict()  # same width, /16 patches
    save_file(uni_like, str(tmp_path / "uni-like.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch: .*patch_embed\.proj\.weight \(192, 3, 16, 16\)"):
        load_model(TINY, weights=tmp_path / "uni-like.safetensors")


@pytest.mark.parametrize("kind", ["safetensors", "release_pth"])
def test_truncated_files_fail_with_one_line(files, tmp_path, kind):
    src = files[kind]
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(cut))}: cannot read weights: ") as err:
        load_model(TINY, weights=cut)
    assert "\n" not in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": _Exploit()}, path)
    with pytest.raises(WeightsError, match="evil.pth: cannot read weights: refused: the pickle references code"):
        load_model(TINY, weights=path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_unknown_model_name_and_non_dict_file(tmp_path):
    with pytest.raises(GpfmError, match="unknown model 'gpfm2'"):
        load_model("gpfm2", weights=tmp_path / "x.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match="tensor.pth: expected a dict of tensors, found Tensor"):
        load_model(TINY, weights=tmp_path / "tensor.pth")
    with pytest.raises(WeightsError, match="weights file not found"):
        load_model(TINY, weights=tmp_path / "absent.safetensors")


def test_sha256_and_device_dtype(files):
    assert sha256_file(files["safetensors"]) == hashlib.sha256(files["safetensors"].read_bytes()).hexdigest()
    model = load_model(TINY, weights=files["safetensors"], dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
