"""The model registry: the only list of model names, and the cfg each name carries.

A family file (``vit.py``) declares its variants with ``@register_model``; everything else — the
CLI, the pipeline's preprocessing, the backends, the tests — reads names and preprocessing from
here, so normalization constants and input sizes are never copied by hand.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from gpfm_engine.errors import GpfmError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (raw checkpoint object) -> (state dict in the builder's names, layout description)
Converter = Callable[[Mapping[str, Any]], "tuple[dict[str, Any], str]"]


@dataclass(frozen=True)
class ModelCfg:
    """Architecture, preprocessing and weight sources of one registered encoder.

    ``arch`` holds the builder's keyword arguments; ``input_size``/``interpolation``/``mean``/``std``
    and ``fov_um`` say how a patch must be prepared (the authors' recipe); the weights fields say
    where ``load_model`` looks (see ``weights.py``).
    """

    name: str
    arch: Mapping[str, Any]
    builder: Callable[..., nn.Module]
    convert: Converter
    feature_dim: int
    input_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fov_um: float = 128.0
    weights_env: str | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None
    packaged_weights: str | None = None  # file name inside gpfm_engine/models/weights/
    optional_keys: frozenset[str] = field(default_factory=frozenset)  # parameters weights may omit
    license: str = ""
    description: str = ""

    def build(self, **overrides: Any) -> nn.Module:
        """A randomly initialised model; ``None`` overrides are dropped so unset options keep defaults."""
        kwargs = dict(self.arch) | {k: v for k, v in overrides.items() if v is not None}
        model = self.builder(**kwargs)
        model.cfg = self
        return model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for run recipes (no callables)."""
        d = asdict(self)
        for k in ("builder", "convert"):
            d.pop(k)
        d["optional_keys"] = sorted(self.optional_keys)
        d["arch"] = dict(self.arch)
        return d


_REGISTRY: dict[str, ModelCfg] = {}


def register_model(fn: Callable[[], ModelCfg]) -> Callable[[], ModelCfg]:
    """Decorator for a family's entrypoint: a function returning its ``ModelCfg`` (plain data)."""
    cfg = fn()
    if cfg.name in _REGISTRY:
        raise ValueError(f"model '{cfg.name}' is registered twice")
    _REGISTRY[cfg.name] = cfg
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_cfg(name: str) -> ModelCfg:
    """The cfg of a registered model; an unknown name is one error line listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise GpfmError(f"unknown model '{name}'; registered models: {', '.join(list_models())}") from None


def build_model(name: str, **overrides: Any) -> nn.Module:
    """A registered architecture with random weights (tests, training); see ``ModelCfg.build``."""
    return get_model_cfg(name).build(**overrides)
