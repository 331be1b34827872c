"""Encoders: the registry of names, the DINOv2 ViT family, and weight loading.

``load_model(name)`` is the entry point; ``list_models()`` is the one list of names; each name's
``ModelCfg`` (``get_model_cfg``) carries its preprocessing. Families register themselves on import.
"""
from gpfm_engine.models.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelCfg,
    build_model,
    get_model_cfg,
    list_models,
    register_model,
)
from gpfm_engine.models import vit  # noqa: F401,E402 - registers the ViT variants
from gpfm_engine.models import conch, phikon  # noqa: F401,E402 - register GPFM's other experts
from gpfm_engine.models.weights import load_model, resolve_weights, sha256_file  # noqa: E402

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelCfg", "build_model", "get_model_cfg", "list_models",
           "load_model", "register_model", "resolve_weights", "sha256_file"]
