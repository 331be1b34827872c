"""The device check: one script that proves and measures the GPU path on a machine with a GPU.

Sections, each failing soft (an error is reported and the next section runs):

build       ``_core.build_info()``: CUDA launchers compiled and usable; versions.
decode      every GPU decoder plug-in vs the CPU decoder on the spliced tiles of synthesized YCbCr and
            Aperio-RGB slides (and CMU-1-Small-Region.svs when present): max/mean difference, the
            colour probe, tiles/s against the CPU decoder on all cores; the pinned upload path.
gather      the gather kernel (crop + antialiased bicubic + normalize) on CUDA vs CPU: max diff.
async       no host synchronisation per batch: while the engine stream is kept busy, each stage's host
            call (upload, gather, model, feature copy, each GPU decoder, compiled graph replay) must
            only enqueue work; a slide streams under ``torch.cuda.set_sync_debug_mode("error")``.
features    engine features on CUDA bf16 vs CPU fp32 for the same tiles: cosine per tile >= 0.999.
model       ViT-L/14 at 224 (GPFM's architecture, RANDOM weights: speed does not depend on the values)
            in img/s and as a fraction of 4,880 img/s (162 GFLOP/img at the measured 790 TFLOP/s
            bf16): torch eager bf16, torch.compile + CUDA graphs, TensorRT when importable.
end-to-end  ``gpfm-engine extract`` over synthesized slides: the engine's GPU decoder with the eager
            model, then with torch.compile + CUDA graphs (the CUDA default; its features checked
            against the eager run's), then the CPU decoder; each against the model-only rate of the
            same backend, the best against the 3,500 img/s goal. One engine per configuration does a
            warm-up run (compilation, graph capture) and the measured run.
baseline    the PyTorch baseline on the same GPU and slide (OpenSlide reads on a thread pool, PIL
            resize, the same model and precision): the end-to-end ratio against the 8x goal.

The throughput table and the check verdicts are appended to benchmarks/RESULTS.md with the date,
GPU and versions. Budget: under 6 minutes on an H200 (``--budget-s``; sections that would not
fit are skipped with the reason). ``--dry-run`` runs every section on the CPU with tiny inputs and
a tiny model, to prove the script itself works where no GPU is (tests/test_gpu_check.py).

Run (repository root):  python benchmarks/gpu_check.py [--dry-run] [--data DIR] [--results FILE]
On a lent device machine: benchmarks/gpu_check_device.sh (prepare here, run there).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

log = logging.getLogger("gpu_check")

CEILING_IMG_S = 4880.0     # ViT-L/14 @224: 162 GFLOP/img at 790 TFLOP/s measured bf16 GEMM (H200)
GOAL_E2E_IMG_S = 3500.0
GOAL_E2E_OF_MODEL = 0.95
GOAL_VS_BASELINE = 8.0
COSINE_MIN = 0.999
DECODE_TOLERANCE = 12      # grey levels: GPU IDCT/upsampling vs libjpeg-turbo; colour bugs show as 100+
REAL_APERIO = Path("wsi/aperio/CMU-1-Small-Region.svs")
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


# --------------------------------------------------------------------------- plumbing


@dataclass
class Sizes:
    """Problem sizes: full on a GPU, tiny for ``--dry-run`` on a CPU."""

    model: str = "gpfm"                 # ViT-L/14, random weights
    precision: str = "bf16"
    batch: int = 256
    batches: tuple[int, ...] = (256, 512)
    decode_tiles: int = 1024
    real_tiles: int = 130               # CMU-1-Small-Region.svs has 10 x 13 level-0 tiles
    slide: tuple[int, int] = (2400, 1800)
    e2e_slide: tuple[int, int] = (16000, 12000)
    e2e_slides: int = 8
    e2e_overlap: float = 0.5
    feature_tiles: int = 16
    measure_s: float = 4.0

    @classmethod
    def dry(cls) -> "Sizes":
        return cls(model="gpfm-tiny", precision="fp32", batch=8, batches=(8,), decode_tiles=16, real_tiles=16,
                   slide=(720, 480), e2e_slide=(1440, 960), e2e_slides=1, e2e_overlap=0.0, feature_tiles=2, measure_s=0.2)


@dataclass
class Check:
    """One verdict line of the summary: a section's check, its value and whether it passed."""

    section: str
    name: str
    ok: bool | None          # None = not run (skipped)
    detail: str


@dataclass
class Rate:
    """One row of the throughput table."""

    name: str
    img_s: float | None
    detail: str

    @property
    def fraction(self) -> float | None:
        return None if self.img_s is None else self.img_s / CEILING_IMG_S


@dataclass
class Ctx:
    """What every section gets: device, sizes, scratch folder, deadline, and where results go."""

    device: torch.device
    sizes: Sizes
    work: Path
    data: Path | None
    deadline: float
    dry_run: bool
    checks: list[Check] = field(default_factory=list)
    rates: list[Rate] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, section: str, name: str, ok: bool | None, detail: str) -> None:
        self.checks.append(Check(section, name, ok, detail))
        log.info("[%s] %s: %s %s", section, name, {True: "ok", False: "FAIL", None: "skipped"}[ok], detail)

    def rate(self, name: str, img_s: float | None, detail: str) -> None:
        self.rates.append(Rate(name, img_s, detail))
        log.info("[throughput] %s: %s img/s %s", name, "-" if img_s is None else f"{img_s:,.0f}", detail)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def timed_rate(ctx: Ctx, fn: Callable[[], object], items: int, max_calls: int = 1000) -> float:
    """Items per second of ``fn`` after one warm call, over at least 3 calls and ``measure_s`` seconds."""
    fn()
    ctx.sync()
    calls, t0 = 0, time.perf_counter()
    while calls < max_calls and (calls < 3 or time.perf_counter() - t0 < ctx.sizes.measure_s):
        fn()
        calls += 1
        if calls % 8 == 0:
            ctx.sync()  # keep the host within a few calls of the device, so the clock means something
    ctx.sync()
    return items * calls / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- inputs


def synth_slide(ctx: Ctx, name: str, **kwargs) -> Path:
    from gpfm_engine import synth

    path = ctx.work / name
    if not path.exists():
        synth.write_slide(path, **kwargs)
    return path


def tiled_tissue_slide(ctx: Ctx, name: str, size: tuple[int, int]) -> Path:
    """A large slide made fast: one rendered 2400 px tissue block repeated (rendering is the slow part)."""
    from gpfm_engine import synth

    path = ctx.work / name
    if path.exists():
        return path
    block = min(2400, size[0], size[1])
    tile = synth.TissuePattern(block, block, coverage=0.9, seed=3).render(0, 0, block, block)
    reps = (-(-size[1] // block), -(-size[0] // block), 1)
    image = np.ascontiguousarray(np.tile(tile, reps)[: size[1], : size[0]])
    return synth.write_slide(path, image=image, mpp=0.25)


def raw_tiles(path: Path, limit: int) -> list[bytes]:
    from gpfm_engine.slide import open_slide

    with open_slide(path, backend="tiff") as slide:
        n = min(limit, slide.tile_layout(0).count)
        return slide.read_raw_tiles(0, list(range(n)))


def random_weights(ctx: Ctx, name: str) -> Path:
    """Seeded random weights of a registered architecture, saved once for engine and baseline."""
    path = ctx.work / f"{name}-random.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        from gpfm_engine.models import build_model

        torch.manual_seed(0)
        state = build_model(name).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def tissue_images(n: int, size: int = 512) -> np.ndarray:
    """``n`` uint8 RGB tissue-like images (different regions of one synthesized pattern)."""
    from gpfm_engine import synth

    pattern = synth.TissuePattern(size * 8, size * 8, coverage=0.9, seed=5)
    return np.stack([pattern.render(size * (i % 8), size * (i // 8 % 8), size, size) for i in range(n)])


# --------------------------------------------------------------------------- sections


def section_build(ctx: Ctx) -> None:
    from gpfm_engine.kernels import build_info

    info = build_info()
    ctx.cache["build"] = info
    detail = (f"cuda_compiled={info['cuda_compiled']} archs={info['cuda_architectures']} "
              f"runtime={info['cuda_runtime_version']} driver={info['cuda_driver_version']} "
              f"devices={info['cuda_device_count']}")
    if ctx.dry_run:
        ctx.check("build", "extension imports", True, detail + " (dry run: CUDA not required)")
        return
    ctx.check("build", "CUDA launchers compiled", bool(info["cuda_compiled"]), detail)
    ctx.check("build", "CUDA usable", bool(info["cuda_usable"]), detail)


def section_decode(ctx: Ctx) -> None:
    from gpfm_engine.cuda_stream import on_engine_stream
    from gpfm_engine.decode import cpu
    from gpfm_engine.decode.gpu import GPU_DECODERS, create_gpu_decoder, probe
    from gpfm_engine.errors import MissingExtraError

    sets = {
        "YCbCr 4:2:0": raw_tiles(synth_slide(ctx, "ycbcr.svs", size=ctx.sizes.slide, compression="jpeg"), 64),
        "Aperio RGB": raw_tiles(synth_slide(ctx, "rgb.svs", size=ctx.sizes.slide, compression="jpeg_rgb"), 64),
    }
    if ctx.data is not None and (ctx.data / REAL_APERIO).exists():
        sets["CMU-1-Small-Region"] = raw_tiles(ctx.data / REAL_APERIO, ctx.sizes.real_tiles)
    else:
        ctx.check("decode", "real Aperio slide", None, f"{REAL_APERIO} not found under --data")
    refs = {k: np.stack(cpu.decode(v, "jpeg")) for k, v in sets.items()}
    bench = (sets["YCbCr 4:2:0"] * (-(-ctx.sizes.decode_tiles // len(sets["YCbCr 4:2:0"]))))[: ctx.sizes.decode_tiles]
    mp = sum(int(np.prod(t.shape[:2])) for t in cpu.decode(bench[:1], "jpeg")) * len(bench) / 1e6

    # CPU-decoded tiles reach the engine stream through the pinned side-stream upload
    from gpfm_engine.cuda_stream import upload_tiles

    ref = refs["YCbCr 4:2:0"]
    up = upload_tiles(list(ref), ctx.device)
    with on_engine_stream(ctx.device):
        seen = up.to(torch.int16).cpu()  # a kernel on the engine stream reads what the side stream copied
    ctx.check("decode", "pinned upload -> engine stream", torch.equal(seen, torch.from_numpy(ref).to(torch.int16)),
              f"{len(ref)} CPU-decoded tiles arrive bit-identical")
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        cpu_rate = timed_rate(ctx, lambda: cpu.decode_map(pool, bench, "jpeg", chunks=4 * threads), len(bench))
    ctx.check("decode", "cpu decoder", True, f"{cpu_rate:,.0f} tiles/s ({cpu_rate * mp / len(bench):,.0f} MP/s) "
                                             f"on {threads} threads (libjpeg-turbo)")
    for name in GPU_DECODERS:
        try:
            decoder = create_gpu_decoder(name, ctx.device)
        except MissingExtraError as exc:
            ctx.check("decode", name, None, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a library that imports but cannot start here
            ctx.check("decode", name, None if ctx.dry_run else False, f"cannot start: {one_line(exc)}")
            continue
        with on_engine_stream(decoder.device):
            why = probe(decoder)
            diffs = []
            for label, streams in sets.items():
                got = decoder._decode_batch(streams).cpu().numpy().astype(np.int16)  # the GPU path itself, no fallback
                d = np.abs(got - refs[label].astype(np.int16))
                diffs.append(f"{label} max {int(d.max())} mean {float(d.mean()):.2f}")
                ok = int(d.max()) <= DECODE_TOLERANCE
                ctx.check("decode", f"{name} vs cpu, {label}", ok, f"max diff {int(d.max())}, mean {float(d.mean()):.3f}")
            rate = timed_rate(ctx, lambda: decoder._decode_batch(bench), len(bench), max_calls=50)
        ctx.cache.setdefault("decoders", {})[name] = (decoder, sets["YCbCr 4:2:0"])
        ctx.check("decode", f"{name} probe", why is None, why or "YCbCr and RGB probe tiles match the CPU decoder")
        ctx.check("decode", f"{name} speed", True, f"{rate:,.0f} tiles/s ({rate * mp / len(bench):,.0f} MP/s), "
                                                  f"{rate / cpu_rate:.2f}x the CPU decoder; batch {len(bench)}")
    try:
        auto = create_gpu_decoder("auto", ctx.device)
        ctx.check("decode", "auto selection", True, f"picked {auto.name}")
    except Exception as exc:  # noqa: BLE001
        ctx.check("decode", "auto selection", None if ctx.dry_run else False, one_line(exc))


def section_gather(ctx: Ctx) -> None:
    from gpfm_engine.gather import PatchGather, resample_images
    from gpfm_engine.models import get_model_cfg
    from gpfm_engine.slide import open_slide

    cfg = get_model_cfg(ctx.sizes.model)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (8, 512, 512, 3), dtype=np.uint8))
    gpu_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    ref = resample_images(images, cfg.input_size, cfg.mean, cfg.std, torch.float32)
    got = resample_images(images.to(gpu_device), cfg.input_size, cfg.mean, cfg.std, torch.float32)
    d = float((got.cpu() - ref).abs().max())
    ctx.check("gather", "resample_images cuda vs cpu (random 512->224)", d <= 1e-4, f"max abs diff {d:.2e}")

    path = synth_slide(ctx, "gather.svs", size=ctx.sizes.slide, compression="jpeg")
    with open_slide(path) as slide:
        layout = slide.tile_layout(0)
        ys, xs = np.mgrid[0: ctx.sizes.slide[1]: 173, 0: ctx.sizes.slide[0]: 191]  # some cross the edge: white
        coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)[:64]
        for size_read in (512.0, 300.5):
            gather = PatchGather(layout, 0, size_read, cfg.input_size, cfg.mean, cfg.std, torch.float32)
            plan = gather.plan(coords, 1.0)
            tiles = torch.from_numpy(np.stack(slide.read_tiles(0, list(plan.tile_indices))))
            out_cpu = torch.empty((len(coords), 3, cfg.input_size, cfg.input_size))
            gather.run(tiles, plan, out_cpu)
            out_gpu = torch.empty_like(out_cpu, device=gpu_device)
            gather.run(tiles.to(gpu_device), plan, out_gpu)
            d = float((out_gpu.cpu() - out_cpu).abs().max())
            ctx.check("gather", f"PatchGather cuda vs cpu ({size_read} px -> {cfg.input_size})", d <= 1e-4,
                      f"max abs diff {d:.2e} over {len(coords)} patches")


BUSY_S = 0.3  # how long the engine stream is kept busy while a host call is timed


def busy_cycles(ctx: Ctx) -> int:
    """GPU clock cycles of ``torch.cuda._sleep`` that keep the engine stream busy for ``BUSY_S``."""
    if "busy_cycles" not in ctx.cache:
        from gpfm_engine.cuda_stream import on_engine_stream

        with on_engine_stream(ctx.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(50_000_000)
            end.record()
        ctx.sync()
        ctx.cache["busy_cycles"] = int(BUSY_S * 50_000_000 / (start.elapsed_time(end) / 1e3))
    return ctx.cache["busy_cycles"]


def check_enqueue_only(ctx: Ctx, name: str, fn: Callable[[], object]) -> None:
    """Check that a host call only enqueues work: with the engine stream busy for ``BUSY_S`` (a
    device-side sleep), the call must return long before the sleep ends."""
    from gpfm_engine.cuda_stream import on_engine_stream

    cycles = busy_cycles(ctx)
    with on_engine_stream(ctx.device):
        fn()  # first call outside the measurement: allocations, handles, kernel selection
        ctx.sync()
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    ctx.sync()
    ctx.check("async", name, seconds < BUSY_S / 2,
              f"host call took {seconds * 1e3:.1f} ms while the stream was busy for {BUSY_S * 1e3:.0f} ms")


def section_async(ctx: Ctx) -> None:
    """No host synchronisation per batch: each stage's host call only enqueues work, and a whole
    slide streams under ``torch.cuda.set_sync_debug_mode("error")`` after its first batch."""
    if ctx.device.type != "cuda":
        ctx.check("async", "stages enqueue without waiting for the GPU", None, "skipped: needs CUDA")
        return
    from gpfm_engine.cuda_stream import to_host_async, upload_tiles
    from gpfm_engine.gather import PatchGather
    from gpfm_engine.models import get_model_cfg
    from gpfm_engine.slide import TileLayout

    cfg = get_model_cfg(ctx.sizes.model)
    tiles = list(np.stack([tissue_images(1, 240)[0]] * 16))
    layout = TileLayout(tile_width=240, tile_height=240, columns=4, rows=4, compression="jpeg")
    gather = PatchGather(layout, 0, 512.0, cfg.input_size, cfg.mean, cfg.std, torch.bfloat16)
    plan = gather.plan(np.array([[0, 0], [100, 200], [300, 50]]), 1.0)
    tiles_gpu = upload_tiles(tiles, ctx.device)[: len(plan.tile_indices)]
    out = gather.empty_batch(len(plan), ctx.device)
    backend = _model_backend(ctx)
    x = torch.zeros((64, *backend.input_shape), device=ctx.device, dtype=backend.input_dtype)
    feats = torch.zeros((256, cfg.feature_dim), device=ctx.device)
    stages: dict[str, Callable[[], object]] = {
        "upload_tiles (pinned, side stream)": lambda: upload_tiles(tiles, ctx.device),
        "gather.run (plan upload + kernel)": lambda: gather.run(tiles_gpu, plan, out),
        "backend.run (torch eager bf16, batch 64)": lambda: backend.run(x),
        "to_host_async (features)": lambda: to_host_async(feats),
    }
    for name, (decoder, streams) in ctx.cache.get("decoders", {}).items():
        stages[f"{name} decode ({len(streams)} tiles)"] = lambda d=decoder, st=streams: d._decode_batch(st)
    for name, fn in stages.items():
        check_enqueue_only(ctx, name, fn)
    del backend
    _stream_under_sync_debug(ctx)


def _stream_under_sync_debug(ctx: Ctx) -> None:
    """Every batch after the first of a slide's stream (GPU decode, gather, eager model, row drop,
    hand-over) under torch's sync debug mode: any host synchronisation torch makes raises."""
    from gpfm_engine.engine import Engine
    from gpfm_engine.pipeline import stream_slide

    engine = Engine(model=ctx.sizes.model, weights=str(random_weights(ctx, ctx.sizes.model)), device=ctx.device,
                    precision=ctx.sizes.precision, batch_size=2, compile=False, cuda_graphs=False)
    path = synth_slide(ctx, "gather.svs", size=ctx.sizes.slide, compression="jpeg")
    decoder = engine.gpu_decoder
    with engine.open(path) as slide:
        batches = stream_slide(engine, engine.plan(slide))
        next(batches)  # the first batch also sets the slide up (buffers, decoder state)
        torch.cuda.set_sync_debug_mode("error")
        try:
            rest = list(batches)
            ok, detail = (True, f"{len(rest)} more batches of 2 patches, no host sync") if rest else \
                (None, "the slide has a single batch")
        except RuntimeError as exc:
            ok, detail = False, one_line(exc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ctx.check("async", f"stream_slide under sync_debug_mode=error ({decoder.name if decoder else 'CPU'} decode)",
              ok, detail)


def section_features(ctx: Ctx) -> None:
    from gpfm_engine.engine import Engine

    weights = str(random_weights(ctx, ctx.sizes.model))
    images = tissue_images(ctx.sizes.feature_tiles)
    ref = Engine(model=ctx.sizes.model, weights=weights, device="cpu", precision="fp32").embed_tiles(images)
    precision = ctx.sizes.precision
    got = Engine(model=ctx.sizes.model, weights=weights, device=ctx.device, precision=precision,
                 compile=False, cuda_graphs=False).embed_tiles(images)  # compiled features: end-to-end section
    cos = torch.nn.functional.cosine_similarity(got.float().cpu(), ref.float(), dim=1)
    ctx.check("features", f"{ctx.sizes.model} {ctx.device.type} {precision} vs cpu fp32 (random weights)",
              float(cos.min()) >= COSINE_MIN, f"cosine min {float(cos.min()):.5f} mean {float(cos.mean()):.5f} "
                                              f"over {len(images)} tissue tiles (goal >= {COSINE_MIN})")


def _model_backend(ctx: Ctx, **options):
    from gpfm_engine.backends.torch_backend import TorchBackend
    from gpfm_engine.models import build_model

    torch.manual_seed(0)
    return TorchBackend(build_model(ctx.sizes.model), ctx.device, ctx.sizes.precision, **options)


def _model_rate(ctx: Ctx, backend, batch: int) -> float:
    from gpfm_engine.cuda_stream import on_engine_stream

    x = torch.randn((batch, *backend.input_shape), device=ctx.device).to(backend.input_dtype)
    with on_engine_stream(ctx.device):
        return timed_rate(ctx, lambda: backend.run(x), batch)


def _model_compiled(ctx: Ctx, label: str) -> None:
    batch = ctx.sizes.batch
    t0 = time.perf_counter()
    compiled = _model_backend(ctx, compile=True, cuda_graphs=True, buckets=(batch,))
    x = torch.randn((batch, *compiled.input_shape), device=ctx.device).to(compiled.input_dtype)
    compiled.run(x)
    ctx.sync()
    setup = time.perf_counter() - t0
    rate = _model_rate(ctx, compiled, batch)
    ctx.rate(f"model-only: torch.compile + CUDA graphs, batch {batch}", rate, f"{label}; compile+capture {setup:.0f} s")
    ctx.cache["model_only"] = max(ctx.cache["model_only"], rate)
    ctx.cache["model_compiled"] = rate
    check_enqueue_only(ctx, f"backend.run (torch.compile + CUDA graph replay, batch {batch})", lambda: compiled.run(x))


def section_model(ctx: Ctx) -> None:
    label = f"{ctx.sizes.model} (random weights) {ctx.sizes.precision}"
    eager = _model_backend(ctx)
    for batch in ctx.sizes.batches:
        rate = _model_rate(ctx, eager, batch)
        ctx.rate(f"model-only: torch eager, batch {batch}", rate, label)
        ctx.cache["model_only"] = max(ctx.cache.get("model_only", 0.0), rate)
        if batch == ctx.sizes.batch:
            ctx.cache["model_eager"] = rate  # what end-to-end runs
    del eager
    if ctx.device.type != "cuda":
        ctx.rate("model-only: torch.compile + CUDA graphs", None, "skipped: needs CUDA")
    elif ctx.left() < 180:
        ctx.rate("model-only: torch.compile + CUDA graphs", None, f"skipped: {ctx.left():.0f} s of budget left")
    else:
        try:
            _model_compiled(ctx, label)
        except Exception as exc:  # noqa: BLE001 - e.g. no Triton here: report it, measure TensorRT anyway
            ctx.rate("model-only: torch.compile + CUDA graphs", None, f"failed: {one_line(exc)}")
            ctx.check("model", "torch.compile + CUDA graphs", False, one_line(exc))
    if importlib.util.find_spec("tensorrt") is None:
        ctx.rate("model-only: TensorRT", None, "skipped: tensorrt not importable")
    elif ctx.device.type != "cuda" or ctx.left() < 200:
        ctx.rate("model-only: TensorRT", None, f"skipped: needs CUDA and >= 200 s of budget ({ctx.left():.0f} s left)")
    else:
        from gpfm_engine.backends import create_backend

        trt = create_backend("tensorrt", ctx.sizes.model, weights=str(random_weights(ctx, ctx.sizes.model)),
                             device=ctx.device, precision=ctx.sizes.precision)
        rate = _model_rate(ctx, trt, ctx.sizes.batch)
        ctx.rate(f"model-only: TensorRT, batch {ctx.sizes.batch}", rate, label)
        ctx.cache["model_only"] = max(ctx.cache["model_only"], rate)


def _extract(ctx: Ctx, req, engine, slides: Sequence[Path], out: Path) -> tuple[int, float]:
    """``gpfm-engine extract`` as the library runs it, on ``engine``; (patches, wall seconds)."""
    import json

    from gpfm_engine.extract import run_extract

    req = dataclasses.replace(req, slides=[str(p) for p in slides], out=out)
    t0 = time.perf_counter()
    status = run_extract(req, engine=engine)
    seconds = time.perf_counter() - t0
    run = json.loads((out / "run.json").read_text())
    if status != 0 or run["totals"].get("done", 0) != len(slides):
        errors = [row.get("error") for row in run["slides"].values() if row.get("error")]
        raise RuntimeError(f"extract exited {status}: {errors[0] if errors else run['totals']}")
    return int(run["totals"]["patches"]), seconds


@dataclass
class _Variant:
    """One end-to-end configuration: what the extract request changes, and how the row names it."""

    key: str
    options: dict[str, Any]
    how: str
    needs_s: float = 60.0
    skip: str | None = None

    @property
    def compiled(self) -> bool:
        return bool(self.options.get("compile"))


def _e2e_variants(ctx: Ctx) -> list[_Variant]:
    """The engine's default data path with the eager model first (the baseline of the end-to-end /
    model-only ratio), then with torch.compile + CUDA graphs (the CUDA default), then the CPU
    decoder when a GPU decoder was chosen. A dry run compiles on the CPU (no CUDA graphs there)."""
    from gpfm_engine.engine import Engine

    eager = {"compile": False, "cuda_graphs": False}
    cpu = "CPU decode (libjpeg-turbo threads)" + (" + pinned upload" if ctx.device.type == "cuda" else "")
    chosen = Engine(model=ctx.sizes.model, device=ctx.device, compile=False, cuda_graphs=False).gpu_decoder
    auto = f"GPU decode ({chosen.name})" if chosen is not None else cpu
    on_cuda = ctx.device.type == "cuda"
    compiled = {"compile": True, "cuda_graphs": on_cuda}
    graphs = "torch.compile + CUDA graphs" if on_cuda else "torch.compile (CPU: no CUDA graphs)"
    no_cxx = None if on_cuda or shutil.which("g++") or shutil.which("c++") else "inductor needs a C++ compiler on CPU"
    out = [_Variant("eager", dict(eager, decoder="auto"), f"{auto}, torch eager"),
           _Variant("compiled", dict(compiled, decoder="auto"), f"{auto}, {graphs}", needs_s=150.0, skip=no_cxx)]
    if chosen is not None:
        out.append(_Variant("cpu-decode", dict(eager, decoder="cpu"), f"{cpu}, torch eager"))
    return out


def _features_agree(ctx: Ctx, a: Path, b: Path, name: str) -> None:
    """Per-row cosine of two runs' h5 features of the same slide (same coords required)."""
    import h5py

    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        same_coords = np.array_equal(fa["coords"][:], fb["coords"][:])
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(fa["features"][:]).float(),
                                                    torch.from_numpy(fb["features"][:]).float(), dim=1)
    ok = same_coords and float(cos.min()) >= COSINE_MIN
    ctx.check("end-to-end", name, ok, f"same coords: {same_coords}; cosine min {float(cos.min()):.5f} "
                                      f"mean {float(cos.mean()):.5f} over {len(cos)} patches (goal >= {COSINE_MIN})")


def section_end_to_end(ctx: Ctx) -> None:
    from gpfm_engine.extract import ExtractRequest, engine_for

    weights = str(random_weights(ctx, ctx.sizes.model))
    first = tiled_tissue_slide(ctx, "e2e-0.svs", ctx.sizes.e2e_slide)
    folder = ctx.work / "e2e"
    folder.mkdir(exist_ok=True)
    slides = []
    for i in range(ctx.sizes.e2e_slides):
        p = folder / f"slide{i}.svs"
        if not p.exists():
            os.link(first, p)  # same bytes under another name: a new slide to the engine
        slides.append(p)
    ctx.cache["e2e_slide"] = slides[0]
    ctx.cache["e2e_weights"] = weights
    base = ExtractRequest(slides=[], out=ctx.work, model=ctx.sizes.model, weights=weights, device=str(ctx.device),
                          backend="torch", precision=ctx.sizes.precision, batch_size=ctx.sizes.batch,
                          overlap=ctx.sizes.e2e_overlap, quiet=True)
    size = f"{ctx.sizes.e2e_slide[0]}x{ctx.sizes.e2e_slide[1]}"
    for k, variant in enumerate(_e2e_variants(ctx)):
        name = f"end-to-end: gpfm-engine extract, {variant.how}"
        if variant.skip or (k and ctx.left() < variant.needs_s):
            ctx.rate(name, None, f"skipped: {variant.skip or f'{ctx.left():.0f} s of budget left'}")
            continue
        req = dataclasses.replace(base, **variant.options)
        engine = engine_for(req)  # one engine for the warm and the measured run: compiled once
        warm = ""
        try:
            if not ctx.dry_run:  # compilation + graph capture, cuDNN/cuBLAS choices, thread pools, decoder state
                _, warm_s = _extract(ctx, req, engine, slides[:1], ctx.work / f"out-warm-{k}")
                warm = f"; warm-up run (1 slide{', compile + capture' if variant.compiled else ''}) {warm_s:.0f} s"
            patches, seconds = _extract(ctx, req, engine, slides, ctx.work / f"out-{k}")
            buckets = engine.backend.describe().get("buckets")
        except Exception as exc:  # noqa: BLE001 - the first variant's failure fails the section
            if not k:
                raise
            ctx.rate(name, None, f"failed: {one_line(exc)}")
            ctx.check("end-to-end", variant.how, False, one_line(exc))
            continue
        finally:
            del engine
        rate = patches / seconds
        ctx.cache.setdefault("e2e", rate)  # the eager engine's default decoder
        if variant.compiled:
            ctx.cache["e2e_compiled"] = rate
            _features_agree(ctx, ctx.work / "out-0" / "h5_files" / "slide0.h5",
                            ctx.work / f"out-{k}" / "h5_files" / "slide0.h5", f"{variant.how} features vs eager")
        ctx.rate(name, rate, f"{len(slides)} slides {size} (overlap {ctx.sizes.e2e_overlap:g}), {patches} patches in "
                             f"{seconds:.1f} s incl. open/mask/grid of the first slide; {ctx.sizes.precision} batch "
                             f"{ctx.sizes.batch}, buckets {buckets}; h5 written{warm}")
    e2e, best = ctx.cache["e2e"], max(ctx.cache["e2e"], ctx.cache.get("e2e_compiled", 0.0))
    for label, end, model in (("eager", e2e, ctx.cache.get("model_eager")),
                              ("compile + graphs", ctx.cache.get("e2e_compiled"), ctx.cache.get("model_compiled"))):
        if end and model:
            ctx.check("throughput", f"end-to-end / model-only (same backend: {label})",
                      end / model >= GOAL_E2E_OF_MODEL if not ctx.dry_run else None,
                      f"{end / model:.1%} of {model:,.0f} img/s (goal >= {GOAL_E2E_OF_MODEL:.0%}); best model-only "
                      f"{ctx.cache['model_only']:,.0f} img/s")
    ctx.cache["e2e"] = best
    ctx.check("throughput", "end-to-end img/s (best configuration)", best >= GOAL_E2E_IMG_S if not ctx.dry_run else None,
              f"{best:,.0f} img/s (goal >= {GOAL_E2E_IMG_S:,.0f} on an H200)")


class _OnDevice(torch.nn.Module):
    """How users run a CUDA model on CPU-made batches: copy each batch over, same precision as the engine."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.device, self.dtype = model.to(device=device, dtype=dtype).eval(), device, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.device, self.dtype, non_blocking=True))


def section_baseline(ctx: Ctx) -> None:
    from benchmarks import baselines
    from gpfm_engine.engine import Engine
    from gpfm_engine.models import load_model

    slide = ctx.cache.get("e2e_slide")
    if slide is None:
        raise RuntimeError("the end-to-end section did not run, so there are no coordinates to replay")
    engine = Engine(model=ctx.sizes.model, device="cpu", overlap=ctx.sizes.e2e_overlap)
    with engine.open(slide) as s:
        plan = engine.plan(s)
        coords = np.asarray(plan.grid.coords, np.int64)
        level, read_size = int(plan.grid.read_level), int(round(float(plan.grid.patch_size_read)))
    model = _OnDevice(load_model(ctx.sizes.model, ctx.cache["e2e_weights"]), ctx.device,
                      {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.sizes.precision, torch.float32))
    transform = baselines.pil_transform(model.model.cfg)
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    feats = baselines.trident_style(slide, coords, level, read_size, model, transform, ctx.sizes.batch, threads)
    ctx.sync()
    rate = len(feats) / (time.perf_counter() - t0)
    ctx.rate("PyTorch baseline (TRIDENT-style)", rate,
             f"OpenSlide read_region on {threads} threads + PIL bicubic + eager model {ctx.sizes.precision}, "
             f"batch {ctx.sizes.batch}; "
             f"{len(coords)} patches of one slide")
    e2e = ctx.cache.get("e2e")
    if e2e:
        ctx.check("throughput", "end-to-end / PyTorch baseline", e2e / rate >= GOAL_VS_BASELINE if not ctx.dry_run else None,
                  f"{e2e / rate:.2f}x (goal >= {GOAL_VS_BASELINE:g}x on the same GPU)")


SECTIONS: tuple[tuple[str, Callable[[Ctx], None], float], ...] = (
    # (name, function, seconds of budget it needs to be worth starting)
    ("build", section_build, 0),
    ("decode", section_decode, 20),
    ("gather", section_gather, 10),
    ("async", section_async, 15),
    ("features", section_features, 30),
    ("model", section_model, 30),
    ("end-to-end", section_end_to_end, 40),
    ("baseline", section_baseline, 20),
)


# --------------------------------------------------------------------------- report


def versions(ctx: Ctx) -> dict[str, str]:
    from gpfm_engine.environment import probe, versions as core_versions

    out = dict(core_versions())
    out["torch.cuda"] = str(torch.version.cuda)
    for name, module in (("torchvision", "torchvision"), ("dali", "nvidia.dali"), ("nvimgcodec", "nvidia.nvimgcodec"),
                         ("tensorrt", "tensorrt")):
        status = probe(name, module)
        out[name] = status.detail if status.available else "not installed"
    build = ctx.cache.get("build") or {}
    out["cuda driver"] = str(build.get("cuda_driver_version", "?"))
    return out


def device_name(ctx: Ctx) -> str:
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    return f"CPU only ({os.cpu_count()} cores)"


def render(ctx: Ctx, errors: dict[str, str], seconds: float, command: str) -> str:
    v = versions(ctx)
    lines = [f"## {_dt.datetime.now().astimezone().isoformat(timespec='seconds')} — GPU check on {device_name(ctx)}"
             + (" (DRY RUN, CPU, tiny sizes: not a measurement)" if ctx.dry_run else ""),
             "",
             f"Command: `{command}`; {seconds:.0f} s.",
             "",
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("platform",)) + ".",
             "",
             f"| throughput | img/s | of {CEILING_IMG_S:,.0f} img/s | detail |",
             "|---|---:|---:|---|"]
    for r in ctx.rates:
        img = "–" if r.img_s is None else f"{r.img_s:,.0f}"
        frac = "–" if r.fraction is None else f"{r.fraction:.1%}"
        lines.append(f"| {r.name} | {img} | {frac} | {r.detail} |")
    lines += ["", "| section | check | verdict | detail |", "|---|---|---|---|"]
    for c in ctx.checks:
        lines.append(f"| {c.section} | {c.name} | {({True: 'ok', False: '**FAIL**', None: 'skipped'})[c.ok]} | {c.detail} |")
    for name, err in errors.items():
        lines.append(f"| {name} | section | **ERROR** | {err} |")
    return "\n".join(lines) + "\n"


def append_results(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text("# gpfm-engine benchmark results\n\nRatios are measured interleaved in one run "
                        "(see benchmarks/harness.py); absolute figures are context only.\n\n")
    with path.open("a") as f:
        f.write("\n" + section)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script, measure nothing")
    p.add_argument("--device", default=None, help="CUDA device (default cuda:0; cpu with --dry-run)")
    p.add_argument("--data", type=Path, default=None,
                   help="shared data root holding wsi/aperio/CMU-1-Small-Region.svs (default $GPFM_TEST_DATA or ../shared/data)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"markdown file the report is appended to (default {RESULTS_MD.relative_to(RESULTS_MD.parents[1])}; "
                        "with --dry-run: none unless given)")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting sections after this many seconds")
    p.add_argument("--only", action="append", choices=[s[0] for s in SECTIONS], help="run only these sections")
    p.add_argument("--keep", type=Path, default=None, help="scratch folder to use and keep (default: a temp folder)")
    p.add_argument("-v", "--verbose", action="store_true", help="progress lines and tracebacks")
    return p.parse_args(argv)


def default_data() -> Path | None:
    env = os.environ.get("GPFM_TEST_DATA")
    for c in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2] / "shared" / "data"]:
        if c.is_dir():
            return c
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda:0"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; use --dry-run to check the script on a CPU",
              file=sys.stderr)
        return 2
    t_start = time.monotonic()
    work = args.keep or Path(tempfile.mkdtemp(prefix="gpfm-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(device=device, sizes=Sizes.dry() if args.dry_run else Sizes(), work=work,
              data=args.data or default_data(), deadline=t_start + args.budget_s, dry_run=args.dry_run)
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    errors: dict[str, str] = {}
    try:
        for name, fn, needs in SECTIONS:
            if args.only and name not in args.only:
                continue
            if ctx.left() < needs:
                errors[name] = f"not started: {ctx.left():.0f} s of the {args.budget_s:.0f} s budget left"
                continue
            t0 = time.monotonic()
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            try:
                fn(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
                errors[name] = one_line(exc)
                log.warning("section %s failed:\n%s", name, traceback.format_exc() if args.verbose else one_line(exc))
            log.info("section %s took %.1f s", name, time.monotonic() - t0)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    command = " ".join(["python benchmarks/gpu_check.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    report = render(ctx, errors, time.monotonic() - t_start, command)
    results = args.results if (args.results or args.dry_run) else RESULTS_MD
    if results is not None:
        append_results(results, report)
    print(report)
    failed = [c for c in ctx.checks if c.ok is False]
    print(f"gpu_check: {len(ctx.checks)} checks, {len(failed)} failed, {len(errors)} section errors"
          + (f" ({', '.join(errors)})" if errors else "") + f"; {len(ctx.rates)} throughput rows"
          + (f"; appended to {results}" if results else ""), file=sys.stderr)
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
