"""Finding, reading and strictly loading model weights; ``load_model`` puts the pieces together.

Resolution order (first hit wins), the same for every registered model:

1. an explicit path (``load_model(name, weights=PATH)``, CLI ``--weights``);
2. the model's environment variable (``cfg.weights_env``, e.g. ``GPFM_WEIGHTS``);
3. the weights shipped inside the package (``cfg.packaged_weights``, gpfm-tiny), or the Hugging Face
   cache (``cfg.hf_repo``/``cfg.hf_filename``) looked up offline; downloading happens only when the
   caller allows network (``allow_download=True`` or ``GPFM_ALLOW_DOWNLOAD=1``).

Reading: safetensors is preferred (no code can run while loading); ``.pth``/``.bin`` go through
``torch.load(weights_only=True)`` so a pickle that carries code is refused. Loading is strict: every
missing, unexpected or wrongly shaped key is named in one ``WeightsError``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gpfm_engine.errors import WeightsError, exception_summary
from gpfm_engine.models.registry import ModelCfg, get_model_cfg

log = logging.getLogger(__name__)

PACKAGED_DIR = Path(__file__).resolve().parent / "weights"
ALLOW_DOWNLOAD_ENV = "GPFM_ALLOW_DOWNLOAD"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights were found and by which rule (recorded in run recipes)."""

    path: Path
    source: str  # "argument" | "env:<VAR>" | "packaged" | "hf-cache" | "hf-download"


def _download_allowed(allow_download: bool | None) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE:
        return False
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in _TRUE


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found ({what})")
    return p


def _from_hub(cfg: ModelCfg, allow_download: bool | None) -> ResolvedWeights | None:
    """The Hugging Face file from the local cache, or downloaded when allowed; None when neither."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(cfg.hf_repo, cfg.hf_filename)
    if isinstance(cached, str) and Path(cached).is_file():
        return ResolvedWeights(Path(cached), "hf-cache")
    if not _download_allowed(allow_download):
        return None
    log.info("downloading %s/%s from Hugging Face", cfg.hf_repo, cfg.hf_filename)
    try:
        return ResolvedWeights(Path(hf_hub_download(cfg.hf_repo, cfg.hf_filename)), "hf-download")
    except Exception as exc:  # noqa: BLE001 - gated repo, no network, missing file: one message
        raise WeightsError(f"hf://{cfg.hf_repo}/{cfg.hf_filename}: download failed: {exception_summary(exc)}") from exc


def _missing_message(cfg: ModelCfg) -> str:
    ways = ["pass weights=PATH (CLI: --weights PATH)"]
    ways.append(f"set {cfg.weights_env}=PATH" if cfg.weights_env else "no environment variable is defined")
    if cfg.packaged_weights:
        ways.append(f"create the packaged file {PACKAGED_DIR / cfg.packaged_weights} "
                    "(python -m training.export CKPT --out FILE)")
    if cfg.hf_repo:
        ways.append(f"put {cfg.hf_repo}/{cfg.hf_filename} in the Hugging Face cache "
                    f"(huggingface-cli download {cfg.hf_repo} {cfg.hf_filename}) or allow downloading "
                    f"(allow_download=True or {ALLOW_DOWNLOAD_ENV}=1)")
    return f"no weights found for model '{cfg.name}': " + "; or ".join(ways)


def resolve_weights(cfg: ModelCfg, weights: str | os.PathLike | None = None,
                    allow_download: bool | None = None) -> ResolvedWeights:
    """Apply the resolution order of the module docstring; one ``WeightsError`` when nothing is found."""
    if weights is not None:
        return ResolvedWeights(_existing(weights, "given explicitly"), "argument")
    if cfg.weights_env and os.environ.get(cfg.weights_env):
        return ResolvedWeights(_existing(os.environ[cfg.weights_env], f"from ${cfg.weights_env}"),
                               f"env:{cfg.weights_env}")
    if cfg.packaged_weights and (PACKAGED_DIR / cfg.packaged_weights).is_file():
        return ResolvedWeights(PACKAGED_DIR / cfg.packaged_weights, "packaged")
    if cfg.hf_repo and cfg.hf_filename:
        hit = _from_hub(cfg, allow_download)
        if hit is not None:
            return hit
    raise WeightsError(_missing_message(cfg))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (the weights identity in run recipes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """The raw checkpoint object: safetensors, or a tensor-only pickle via ``weights_only=True``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or unsafe: one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first}" if first else f"{type(exc).__name__} (truncated or empty file?)"
        if isinstance(exc, pickle.UnpicklingError) and first.startswith("Weights only load failed"):
            reason = "refused: the pickle references code, not only tensors (torch.load weights_only=True)"
        raise WeightsError(f"{path}: cannot read weights: {reason}") from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Any], source: str,
                           optional: frozenset[str] = frozenset()) -> None:
    """Copy ``state`` into ``model`` or raise one error naming missing, unexpected and misshapen keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    not_tensor = [k for k in state if k in expected and not isinstance(state[k], torch.Tensor)]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in state
              if k in expected and k not in not_tensor and state[k].shape != expected[k].shape]
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("not tensors", not_tensor),
                 ("shape mismatch", shapes)) if keys]
    if problems:
        raise WeightsError(f"{source}: weights do not fit the architecture: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=False)


def load_weights(model: nn.Module, cfg: ModelCfg, path: str | os.PathLike) -> str:
    """Read, convert and strictly load one weights file into ``model``; returns the layout name."""
    state, layout = cfg.convert(read_checkpoint(path))
    load_state_dict_strict(model, state, str(path), cfg.optional_keys)
    log.info("loaded %s weights from %s (layout %s)", cfg.name, path, layout)
    return layout


def load_model(name: str, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, allow_download: bool | None = None) -> nn.Module:
    """A registered encoder with its weights, in eval mode: normalized float NCHW -> [N, feature_dim].

    The module carries ``cfg`` (preprocessing), ``weights_path``, ``weights_source``,
    ``weights_layout`` and ``weights_sha256`` for the run recipe.
    """
    cfg = get_model_cfg(name)
    resolved = resolve_weights(cfg, weights, allow_download)
    model = cfg.build()
    model.weights_layout = load_weights(model, cfg, resolved.path)
    model.weights_path = str(resolved.path)
    model.weights_source = resolved.source
    model.weights_sha256 = sha256_file(resolved.path)
    return model.to(device=device, dtype=dtype).eval()
