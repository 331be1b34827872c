"""Model only: the backends on the same random-weight ViTs, fed pre-made normalized batches.

CPU suite: torch fp32 eager (the baseline: what users run), torch bf16 and ONNX Runtime fp32, for
the gpfm-tiny architecture and a ViT-B/14 (the gpfm cfg at width 768, depth 12). The three
variants are timed round-robin in one loop (fp32, bf16, ORT, fp32, bf16, ORT, …) after a warm-up,
so each ratio compares calls exposed to the same machine noise.

GPU suite: ViT-L/14 (the gpfm architecture) bf16 eager (baseline) vs ``torch.compile`` + CUDA
graphs at batch 64, 256 and 512; img/s and the fraction of 4,880 img/s (162 GFLOP/image at the
measured 790 TFLOP/s bf16 GEMM rate of an H200, research/gpu.md §4).

Run: ``python -m benchmarks --stage model [--suite gpu]`` or ``python benchmarks/bench_model.py``.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Callable

import torch

from benchmarks.harness import BenchContext, Comparison, Result, Skipped

log = logging.getLogger(__name__)

GPU_CEILING_IMG_S = 4880.0
# (label, registered cfg whose preprocessing and sizes apply, architecture overrides, CPU batch)
CPU_MODELS = (
    ("gpfm-tiny", "gpfm-tiny", {}, 32),
    ("ViT-B/14", "gpfm", {"embed_dim": 768, "depth": 12, "num_heads": 12}, 8),
)
GPU_BATCHES = (64, 256, 512)


def _images(n: int, size: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        log.info("round %d/%d: %s", i + 1, repeats, ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return times


def _cpu(ctx: BenchContext) -> list[Result]:
    from gpfm_engine.backends.onnx_backend import OnnxBackend
    from gpfm_engine.backends.torch_backend import TorchBackend
    from gpfm_engine.models import build_model

    results: list[Result] = []
    for label, cfg_name, arch, batch in CPU_MODELS:
        batch = max(2, batch // 4) if ctx.quick else batch
        model = build_model(cfg_name, **arch).eval()
        size = model.cfg.input_size
        x = _images(batch, size)
        fp32 = TorchBackend(model, "cpu", "fp32")
        bf16 = TorchBackend(build_model(cfg_name, **arch).eval(), "cpu", "bf16")
        x16 = x.to(torch.bfloat16)  # the pipeline writes the backend's input dtype directly
        fns: dict[str, Callable[[], object]] = {"torch fp32": lambda: fp32.run(x), "torch bf16": lambda: bf16.run(x16)}
        try:
            ort = OnnxBackend.from_model(model, "cpu", "fp32", threads=ctx.threads)
            fns["onnxruntime fp32"] = lambda: ort.run(x)
        except Exception as exc:  # noqa: BLE001 - report, keep the torch comparison
            results.append(Skipped(f"model {label}: onnxruntime vs torch fp32", f"{type(exc).__name__}: {exc}"))
        times = round_robin(fns, ctx.repeats, ctx.warmup)
        for name in fns:
            if name == "torch fp32":
                continue
            results.append(Comparison(
                f"model {label}: {name} vs torch fp32", engine=times[name], baseline=times["torch fp32"],
                work=batch, units="img", engine_label=name, baseline_label="torch fp32",
                note=f"CPU, batch {batch}, {size} px, {ctx.threads} threads, random weights; round-robin timing"))
    return results


def _gpu(ctx: BenchContext) -> list[Result]:
    from gpfm_engine.backends.torch_backend import TorchBackend
    from gpfm_engine.models import build_model

    results: list[Result] = []
    model = build_model("gpfm").eval()
    eager = TorchBackend(model, "cuda", "bf16")
    compiled = TorchBackend(model, "cuda", "bf16", compile=True, cuda_graphs=True, buckets=GPU_BATCHES)
    for batch in GPU_BATCHES[:1] if ctx.quick else GPU_BATCHES:
        x = _images(batch, 224, torch.bfloat16, "cuda")

        def timed(backend: TorchBackend) -> Callable[[], object]:
            def call() -> None:
                backend.run(x)
                torch.cuda.synchronize()
            return call

        times = round_robin({"eager": timed(eager), "compiled": timed(compiled)}, ctx.repeats, max(ctx.warmup, 2))
        comp = Comparison(f"model ViT-L/14 bf16 batch {batch}: compile+CUDA graphs vs eager", engine=times["compiled"],
                          baseline=times["eager"], work=batch, units="img", engine_label="compile+graphs",
                          baseline_label="eager")
        rates = {k: comp.rate(k) for k in ("engine", "baseline")}
        comp.context = {side: {"img_s": r, "fraction_of_4880": r / GPU_CEILING_IMG_S} for side, r in rates.items()}
        comp.note = (f"{torch.cuda.get_device_name()}, random weights; compiled {rates['engine']:,.0f} img/s = "
                     f"{rates['engine'] / GPU_CEILING_IMG_S:.0%} of 4,880, eager {rates['baseline']:,.0f} img/s = "
                     f"{rates['baseline'] / GPU_CEILING_IMG_S:.0%}")
        results.append(comp)
    return results


def run(ctx: BenchContext) -> list[Result]:
    if ctx.suite == "gpu":
        if not torch.cuda.is_available():
            return [Skipped("model (gpu)", "no CUDA device visible")]
        return _gpu(ctx)
    return _cpu(ctx)


def main() -> None:
    import argparse

    from benchmarks.harness import render_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller batches")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(render_markdown(run(BenchContext(suite=args.suite, repeats=args.repeats, quick=args.quick))))


if __name__ == "__main__":
    main()
