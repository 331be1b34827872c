"""Unified knowledge-distillation trainer (GPFM recipe on a DINOv2-style loop).

Entry points: ``python -m training.train`` (train), ``python -m training.export`` (teacher backbone
to safetensors for ``gpfm_engine.load_model``), ``python -m training.linear_probe`` (quality check).
The package sits outside ``gpfm_engine`` because the engine must run without any training code.
"""
