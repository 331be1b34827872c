"""``gpfm-engine extract SLIDES... --out DIR``: the command and the library function behind it.

Exit status: 0 when every slide is done, skipped (already done with the same recipe) or busy
(another live process holds it); 1 when any slide failed or was refused (an output with a
different recipe exists and ``--overwrite`` was not given), unless ``--allow-failures``; 2 for
usage errors (bad options, no slides found, output folder not writable, model/weights missing).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import click
from rich.console import Console

from gpfm_engine.errors import GpfmError

log = logging.getLogger(__name__)


@dataclass
class ExtractRequest:
    """Everything ``extract`` was asked for (one field per CLI option)."""

    slides: Sequence[str]
    out: Path
    model: str = "gpfm"
    weights: str | None = None
    device: str = "auto"
    backend: str = "auto"
    decoder: str = "auto"
    compile: bool | None = None       # None: auto (on for the torch backend on CUDA)
    cuda_graphs: bool | None = None   # None: auto (on for the torch backend on CUDA)
    precision: str | None = None
    fov_um: float | None = None
    mag: float | None = None
    patch_size: int | None = None
    overlap: float | None = None
    mpp: float | None = None
    tissue_threshold: float | None = None
    batch_size: int = 64
    workers: int | None = None
    qc: bool = False
    formats: tuple[str, ...] = ("h5",)
    features_dtype: str = "float32"
    overwrite: bool = False
    on_tile_error: str = "skip"
    allow_failures: bool = False
    limit: int | None = None
    dry_run: bool = False
    quiet: bool = False
    log_json: bool = False
    recursive: bool = False


def make_reporter(req: ExtractRequest):
    from gpfm_engine import progress

    if req.log_json:
        return progress.JsonReporter()
    if req.quiet:
        return progress.Reporter()
    return progress.RichReporter()


def engine_for(req: ExtractRequest):
    """The ``Engine`` a request describes (weights are loaded on first use, not here)."""
    from gpfm_engine.engine import Engine

    return Engine(
        model=req.model, weights=req.weights, device=req.device, backend=req.backend, decoder=req.decoder,
        compile=req.compile, cuda_graphs=req.cuda_graphs, precision=req.precision, batch_size=req.batch_size,
        workers=req.workers, on_tile_error=req.on_tile_error, mpp=req.mpp, fov_um=req.fov_um, mag=req.mag,
        patch_size=req.patch_size, overlap=req.overlap, tissue_threshold=req.tissue_threshold)


def run_extract(req: ExtractRequest, reporter=None, engine=None) -> int:
    """Run an extraction; returns the exit status (see the module docstring).

    ``engine`` reuses a configured ``Engine`` (its loaded weights, compiled model and captured CUDA
    graphs) instead of building one from ``req``'s model options, for repeated runs in one process.
    """
    from gpfm_engine.inputs import collect_slides
    from gpfm_engine.pipeline import Extraction, RunOptions, SlideJob
    from gpfm_engine.runlog import RunLog
    from gpfm_engine.store import FeatureStore

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    inputs = collect_slides(req.slides, recursive=req.recursive)
    if req.limit is not None:
        inputs = inputs[: req.limit]
    if not inputs:
        raise click.UsageError("no slides found in " + " ".join(map(str, req.slides)))
    store = FeatureStore(req.out, formats=req.formats, dtype=req.features_dtype)
    store.prepare()
    engine = engine or engine_for(req)
    if not req.dry_run:  # load the weights before any slide: a missing file is a usage error
        log.info("backend: %s", engine.backend.describe())
    names = store.assign_names([i.path for i in inputs])
    jobs = [SlideJob(i, n) for i, n in zip(inputs, names)]
    runlog = None if req.dry_run else RunLog(store.root, {"argv": sys.argv, "model": req.model,
                                                          "out": str(req.out), "slides_requested": len(jobs)})
    options = RunOptions(overwrite=req.overwrite, dry_run=req.dry_run,
                         qc_dir=(store.root / "qc") if req.qc else None)
    if options.qc_dir is not None:
        options.qc_dir.mkdir(parents=True, exist_ok=True)
    reporter = reporter or make_reporter(req)
    t0 = time.perf_counter()
    records = Extraction(engine, store, runlog, reporter, options).run(jobs)
    failed = [r for r in records if r.failed]
    if req.quiet or req.log_json:  # the rich reporter already printed them as they happened
        for r in failed:
            err.print(f"{r.status.value}: {r.error}")
    log.info("extract: %d slides in %.1f s, %d failed", len(records), time.perf_counter() - t0, len(failed))
    return 1 if failed and not req.allow_failures else 0


def _formats(ctx, param, value: str) -> tuple[str, ...]:
    from gpfm_engine.store import FORMATS

    items = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in FORMATS]
    if bad or not items:
        raise click.BadParameter(f"choose from {', '.join(FORMATS)} (comma-separated), got {value!r}")
    return items


@click.command("extract")
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (h5_files/, pt_files/, qc/, run.json).")
@click.option("--model", default="gpfm", show_default=True, help="Registered encoder name (gpfm, gpfm-tiny, uni...).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Weights file (else the model's env var / package / HF cache).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "tensorrt"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "cpu", "nvimgcodec", "dali", "nvjpeg"]), default="auto", show_default=True,
              help="Tile decoder on CUDA devices (CPU runs always decode on CPU threads).")
@click.option("--compile/--no-compile", default=None,
              help="torch backend: run the model through torch.compile [on for CUDA, off for CPU].")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="torch backend on CUDA: replay captured CUDA graphs on fixed batch buckets [on for CUDA].")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Compute precision [fp32 on CPU, bf16 on CUDA].")
@click.option("--fov-um", type=click.FloatRange(min=0, min_open=True), help="Patch field of view in µm [the model's, 128 for GPFM].")
@click.option("--mag", type=click.FloatRange(min=0, min_open=True), help="Target magnification (with --patch-size), e.g. 20.")
@click.option("--patch-size", type=click.IntRange(min=1), help="Patch size in px at --mag, e.g. 256.")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), help="Patch overlap as a fraction of the patch [0].")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), help="µm/px of level 0 for slides without trustworthy metadata.")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1), help="Minimum tissue fraction of a kept patch [0.25].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), help="Tile decode threads [all CPUs].")
@click.option("--qc", is_flag=True, help="Write a QC picture per slide to DIR/qc/.")
@click.option("--formats", default="h5", show_default=True, callback=_formats, help="h5 and/or pt (CLAM), comma-separated.")
@click.option("--features-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Recompute slides whose existing output has a different recipe.")
@click.option("--on-tile-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="Corrupt stored tile: drop the patches touching it (counted), or fail the slide.")
@click.option("--allow-failures", is_flag=True, help="Exit 0 even when some slides failed.")
@click.option("--limit", type=click.IntRange(min=1), help="Process only the first N slides.")
@click.option("--dry-run", is_flag=True, help="Tissue mask and grid only: patch counts, no features.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display (failures are still printed).")
@click.option("--log-json", is_flag=True, help="One JSON object per event on stdout.")
@click.option("--recursive", "-r", is_flag=True, help="Descend into sub-folders of folder arguments.")
def extract_command(slides: tuple[str, ...], out: Path, **options) -> None:
    """Extract features of SLIDES (files, folders, globs, or a CSV with a path column and
    optional mpp column) into DIR/h5_files/<slide>.h5, TRIDENT's layout."""
    if options["fov_um"] is not None and (options["mag"] is not None or options["patch_size"] is not None):
        raise click.UsageError("give either --fov-um or --mag with --patch-size, not both")
    if (options["mag"] is None) != (options["patch_size"] is None):
        raise click.UsageError("--mag and --patch-size go together")
    req = ExtractRequest(slides=slides, out=out, **options)
    try:
        status = run_extract(req)
    except click.UsageError:
        raise
    except GpfmError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {exc}")
        sys.exit(2)
    sys.exit(status)
