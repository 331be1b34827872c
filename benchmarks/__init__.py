"""gpfm-engine benchmarks: the engine against PyTorch baselines, measured interleaved in one run.

Run ``python -m benchmarks --suite cpu`` from a source checkout (or ``gpfm-engine bench``).
``harness.py`` holds the measurement API used by every stage module ``bench_<stage>.py``.
"""
