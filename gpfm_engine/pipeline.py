"""All the concurrency of feature extraction lives here; every stage it calls is synchronous.

One slide (``stream_slide``)::

    loader thread:  coords of a batch ─► gather plan ─► stored tiles read + decoded by the pool
                    (chunks of ``slide.read_tiles`` in parallel) ─► gather kernel writes the batch
                    straight into a recycled input buffer
    caller thread:  buffer ─► backend.run ─► features (yielded as ``Batch``), buffer recycled

A run over many slides (``run_extraction``) adds two threads::

    prefetch thread: resume decision, lock, open, tissue mask, grid, QC picture of the NEXT slide
                     while the current one runs (queue of ``prefetch_slides``)
    main thread:     stream_slide of the current slide; progress; run.json
    writer thread:   rows appended to the slide's temporary h5; commit (atomic rename) or abort

Bounded memory: ``batches_in_flight`` input buffers circulate between loader and backend (the
loader blocks when none is free), each batch's decoded tiles are capped by a byte budget (a batch
whose tiles would exceed it is gathered in smaller groups), queues are bounded, and every slide is
closed and dropped before the next one starts, so peak memory does not grow with the number of
slides. Every queue ends with a sentinel and every thread is joined in ``finally``.
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from gpfm_engine import locks
from gpfm_engine.cuda_stream import on_engine_stream, to_device, to_host_async
from gpfm_engine.errors import GpfmError, TileDecodeError, exception_summary
from gpfm_engine.runlog import SlideRecord, Status
from gpfm_engine.store import Action, FeatureStore, source_fingerprint

if TYPE_CHECKING:
    from gpfm_engine.engine import Engine, SlidePlan
    from gpfm_engine.inputs import SlideInput
    from gpfm_engine.progress import Reporter
    from gpfm_engine.runlog import RunLog

log = logging.getLogger(__name__)

_END = object()  # queue sentinel


@dataclass(frozen=True)
class PipelineOptions:
    """Depths and budgets of the pipeline (named, so they can be tuned and tested)."""

    batches_in_flight: int = 2          # input buffers circulating between loader and backend
    prefetch_slides: int = 1            # slides opened, masked and gridded ahead of the current one
    tile_budget_bytes: int = 256 << 20  # decoded tiles held for one batch (split into groups above it)
    writer_queue: int = 8               # batches of features waiting for the writer


@dataclass
class Batch:
    """Features of one batch of kept patches (rows touching a corrupt tile already removed)."""

    coords: np.ndarray
    features: torch.Tensor
    tiles_skipped: int = 0


def hand_over(tensor: torch.Tensor) -> torch.Tensor:
    """Make an engine-stream CUDA tensor safe to use on the caller's current stream.

    The caller's stream waits for the engine stream on the device (no host synchronisation), and
    the caching allocator is told the tensor is used there. Host tensors pass through.
    """
    if tensor.is_cuda:
        from gpfm_engine.cuda_stream import engine_stream

        current = torch.cuda.current_stream(tensor.device)
        current.wait_stream(engine_stream(tensor.device))
        tensor.record_stream(current)
    return tensor


def one_line(exc: BaseException) -> str:
    """An exception as one line: our errors already name file and cause; others get their type."""
    if isinstance(exc, GpfmError):
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else ""
    return exception_summary(exc)


# ----------------------------------------------------------------------------- stored tiles


class TileSource:
    """Decoded stored tiles of one slide level, in the form the gather kernel takes on the device.

    CPU: the cached arrays ``slide.read_tiles`` returns, decoded in parallel on the caller-owned
    pool, passed to the kernel as a list (no stacking copy). CUDA: decoded by the GPU decoder when
    one serves the level's compression, else decoded on the CPU and uploaded from pinned memory.
    A tile that cannot be decoded either fails the call (``on_error="fail"``) or is replaced by
    white and reported in the returned set of bad tile indices (``"skip"``), so the caller can
    drop the patches that touch it.
    """

    def __init__(self, slide: Any, level: int, pool: ThreadPoolExecutor, on_error: str, device: torch.device,
                 gpu_decoder: Any = None) -> None:
        self.slide, self.level, self.pool, self.on_error, self.device = slide, level, pool, on_error, device
        layout = slide.tile_layout(level)
        self.tile_shape = (int(layout.tile_height), int(layout.tile_width), 3)
        usable = gpu_decoder is not None and layout.compression in getattr(gpu_decoder, "compressions", ())
        self.gpu_decoder = gpu_decoder if usable else None
        self.bad: set[int] = set()  # corrupt tiles found so far: never decoded (or counted) twice

    @property
    def tile_bytes(self) -> int:
        return int(np.prod(self.tile_shape))

    def fetch(self, indices: Sequence[int]) -> tuple[Any, set[int]]:
        """The decoded tiles of ``indices`` (in order) and the set of indices that were corrupt."""
        if self.gpu_decoder is not None and not self.bad.intersection(indices):
            from gpfm_engine.decode.gpu import decode_slide_tiles

            try:
                return decode_slide_tiles(self.gpu_decoder, self.slide, self.level, indices), set()
            except TileDecodeError:
                if self.on_error == "fail":
                    raise
                # fall through: the CPU path finds every corrupt tile of the batch
        tiles, bad = self._read_host(indices)
        if self.device.type == "cuda":
            from gpfm_engine.cuda_stream import upload_tiles

            return upload_tiles(tiles, self.device), bad
        return tiles, bad

    def _read_host(self, indices: Sequence[int]) -> tuple[list[np.ndarray], set[int]]:
        indices = [int(i) for i in indices]
        bad = self.bad.intersection(indices)
        while True:
            good = [i for i in indices if i not in bad]
            try:
                decoded = self.slide.read_tiles(self.level, good, executor=self.pool)
                break
            except TileDecodeError as exc:
                if self.on_error == "fail" or exc.index in bad or exc.index not in indices:
                    raise
                log.warning("%s (patches touching it are skipped)", exc)
                bad.add(exc.index)  # retry the rest; tiles decoded so far come from the cache
                self.bad.add(exc.index)
        if not bad:
            return decoded, bad
        white = np.full(self.tile_shape, 255, np.uint8)
        found = dict(zip(good, decoded))
        return [found.get(i, white) for i in indices], bad


def rows_touching(coords: np.ndarray, bad_tiles: set[int], layout: Any, downsample: float,
                  patch_size_read: float, out_size: int) -> np.ndarray:
    """Boolean mask of patches whose resampling footprint touches one of ``bad_tiles``.

    The footprint is the patch's source square at the read level widened by the bicubic filter's
    support (2 source px per output px when shrinking), so no dropped pixel can leak into a kept row.
    """
    x = coords[:, 0] / downsample
    y = coords[:, 1] / downsample
    margin = 2.0 * max(1.0, patch_size_read / out_size) + 1.0
    hit = np.zeros(len(coords), bool)
    tw, th, cols = int(layout.tile_width), int(layout.tile_height), int(layout.columns)
    for t in bad_tiles:
        tx0, ty0 = (t % cols) * tw, (t // cols) * th
        hit |= ((x - margin < tx0 + tw) & (x + patch_size_read + margin > tx0)
                & (y - margin < ty0 + th) & (y + patch_size_read + margin > ty0))
    return hit


# ----------------------------------------------------------------------------- one slide


@dataclass
class _Loaded:
    """A batch the loader has gathered into an input buffer, waiting for the backend."""

    coords: np.ndarray
    buffer: torch.Tensor
    drop: np.ndarray
    tiles_skipped: int  # corrupt tiles first found in this batch


class _BatchLoader:
    """The loader thread of ``stream_slide``: gathers batch after batch into recycled buffers."""

    def __init__(self, engine: "Engine", plan: "SlidePlan", pool: ThreadPoolExecutor, options: PipelineOptions) -> None:
        self.engine, self.plan, self.options = engine, plan, options
        self.gather = engine.gather_for(plan)
        self.tiles = TileSource(plan.slide, int(plan.grid.read_level), pool, engine.on_tile_error,
                                  engine.device, engine.gpu_decoder)
        size = engine.cfg.input_size
        shape = (engine.batch_size, 3, size, size)
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        with on_engine_stream(engine.device):  # buffers belong to the stream that uses them
            for _ in range(max(1, options.batches_in_flight)):
                self.free.put(torch.empty(shape, dtype=engine.backend.input_dtype, device=engine.device))
        self.ready: queue.Queue[Any] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpfm-loader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with on_engine_stream(self.engine.device):
                coords = np.asarray(self.plan.grid.coords, dtype=np.int64)
                bs = self.engine.batch_size
                for start in range(0, len(coords), bs):
                    buffer = self._take_buffer()
                    if buffer is None:
                        return
                    self.ready.put(self._fill(coords[start:start + bs], buffer))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            self.ready.put(exc)
        finally:
            self.ready.put(_END)

    def _take_buffer(self) -> torch.Tensor | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _fill(self, coords: np.ndarray, buffer: torch.Tensor) -> _Loaded:
        drop = np.zeros(len(coords), bool)
        offset = 0
        known_bad = len(self.tiles.bad)
        for group in self._groups(coords):
            gplan = self.gather.plan(group, self.plan.downsample)
            tiles, bad = self.tiles.fetch(gplan.tile_indices)
            self.gather.run(tiles, gplan, buffer[offset:offset + len(group)])
            if bad:
                drop[offset:offset + len(group)] = rows_touching(
                    group, bad, self.plan.layout, self.plan.downsample, float(self.plan.grid.patch_size_read),
                    self.engine.cfg.input_size)
            offset += len(group)
        return _Loaded(coords, buffer, drop, len(self.tiles.bad) - known_bad)

    def _groups(self, coords: np.ndarray) -> list[np.ndarray]:
        """Split a batch so that no group's decoded tiles exceed the tile byte budget."""
        tiles = len(self.gather.plan(coords, self.plan.downsample).tile_indices)
        if len(coords) <= 1 or tiles * self.tiles.tile_bytes <= self.options.tile_budget_bytes:
            return [coords]
        half = len(coords) // 2
        return self._groups(coords[:half]) + self._groups(coords[half:])

    def __iter__(self) -> Iterator[_Loaded]:
        while True:
            item = self.ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def recycle(self, buffer: torch.Tensor) -> None:
        self.free.put(buffer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def stream_slide(engine: "Engine", plan: "SlidePlan", pool: ThreadPoolExecutor | None = None,
                 options: PipelineOptions | None = None) -> Iterator[Batch]:
    """Features of a planned slide, batch by batch, in grid order (see the module docstring)."""
    if plan.num_patches == 0:
        return
    options = options or PipelineOptions()
    own_pool = pool is None
    if own_pool:
        pool = ThreadPoolExecutor(engine.workers, thread_name_prefix="gpfm-decode")
    loader = _BatchLoader(engine, plan, pool, options)
    backend = engine.backend
    try:
        for item in loader:
            with on_engine_stream(engine.device):
                features = backend.run(item.buffer[:len(item.coords)])
                if item.drop.any():
                    # rows are chosen by host-computed indices: a boolean mask on the device
                    # would make the host wait for the batch to find out how many rows remain
                    kept = to_device(np.flatnonzero(~item.drop), features.device)
                    features = features.index_select(0, kept)
            loader.recycle(item.buffer)
            yield Batch(item.coords[~item.drop], hand_over(features), item.tiles_skipped)
    finally:
        loader.close()
        if own_pool:
            pool.shutdown(wait=True)


def embed_images(engine: "Engine", groups: Sequence[tuple[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    """Features of uint8 [n, H, W, 3] image groups, returned in the order of ``positions``."""
    from gpfm_engine.gather import resample_images

    total = sum(len(p) for p, _ in groups)
    size, bs = engine.cfg.input_size, engine.batch_size
    backend = engine.backend
    caller = torch.cuda.current_stream(engine.device) if engine.device.type == "cuda" else None
    with on_engine_stream(engine.device) as stream:
        if stream is not None:
            stream.wait_stream(caller)  # the caller's CUDA images may still be in the making
        out = torch.empty((total, engine.feature_dim), device=engine.device)
        for positions, images in groups:
            images = to_device(images, engine.device)
            for start in range(0, len(images), bs):
                chunk = images[start:start + bs]
                batch = resample_images(chunk, size, engine.cfg.mean, engine.cfg.std, backend.input_dtype)
                feats = backend.run(batch)
                out.index_copy_(0, to_device(positions[start:start + bs], engine.device), feats.to(out.dtype))
    return hand_over(out)


# ----------------------------------------------------------------------------- many slides


@dataclass
class SlideJob:
    """One slide of a run: where it is (with its per-slide µm/px) and what its outputs are called."""

    input: "SlideInput"
    name: str

    @property
    def path(self) -> Path:
        return self.input.path

    @functools.cached_property
    def fingerprint(self) -> str:
        """The slide file's identity, recorded in its outputs (computed when first needed)."""
        return source_fingerprint(self.path)


@dataclass
class _Prepared:
    """A slide the prefetch thread made ready: locked, opened, masked and gridded."""

    job: SlideJob
    plan: "SlidePlan"
    lock: Any
    recipe: dict[str, Any]
    started: float
    prepare_seconds: float


@dataclass
class RunOptions:
    """What ``gpfm-engine extract`` asks of a run beyond the engine's own configuration."""

    overwrite: bool = False
    dry_run: bool = False
    qc_dir: Path | None = None
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)


class _Writer:
    """The writer thread: appends rows to the current slide's temporary h5, commits or aborts.

    Messages: ("open", job, dim) · ("rows", coords, HostCopy) · ("commit", attrs, recipe, record, lock)
    · ("abort", record, lock). It reports every finished slide's ``SlideRecord`` on ``done``.
    """

    def __init__(self, store: FeatureStore, depth: int) -> None:
        self.store = store
        self.inbox: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.done: queue.Queue[SlideRecord] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="gpfm-writer", daemon=True)
        self.thread.start()

    def put(self, *message: Any) -> None:
        self.inbox.put(message)

    def _run(self) -> None:
        writer, error = None, None
        while True:
            msg = self.inbox.get()
            if msg[0] is _END:
                if writer is not None:
                    writer.abort()
                return
            kind = msg[0]
            try:
                if kind == "open":
                    writer, error = None, None
                    writer = self.store.open_writer(msg[1].name, msg[2])
                elif kind == "rows" and writer is not None and error is None:
                    writer.append(msg[1], msg[2].wait().float().numpy())
                elif kind == "commit":
                    _, attrs, recipe, record, lock = msg
                    if error is None and writer is not None:
                        writer.commit(dict(attrs, tiles_skipped=record.tiles_skipped), recipe)
                    else:
                        record.status, record.error = Status.FAILED, f"{record.path}: {error}"
                    writer = None
                    self._finish(record, lock)
                elif kind == "abort":
                    if writer is not None:
                        writer.abort()
                    writer = None
                    self._finish(msg[1], msg[2])
            except Exception as exc:  # noqa: BLE001 - a write failure fails this slide only
                error = f"cannot write output: {one_line(exc)}"
                log.error("%s: %s", getattr(writer, "name", "?"), error)
                if writer is not None:
                    writer.abort()
                writer = None
                if kind in ("commit", "abort"):
                    record, lock = (msg[3], msg[4]) if kind == "commit" else (msg[1], msg[2])
                    if not record.failed:
                        record.status, record.error = Status.FAILED, f"{record.path}: {error}"
                    self._finish(record, lock)

    def _finish(self, record: SlideRecord, lock: Any) -> None:
        if lock is not None:
            lock.release()
        record.finished = time.time()
        self.done.put(record)

    def close(self) -> None:
        self.inbox.put((_END,))
        self.thread.join()


class _Heartbeat:
    """Refreshes every slide lock this run holds, including those of slides waiting in the prefetch
    queue, so that no other host ever mistakes a live lock for a stale one."""

    def __init__(self, every_s: float = locks.REFRESH_EVERY_S) -> None:
        self.every_s = every_s
        self._held: list[locks.SlideLock] = []
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpfm-heartbeat", daemon=True)
        self._thread.start()

    def hold(self, lock: locks.SlideLock) -> locks.SlideLock:
        with self._mutex:
            self._held.append(lock)
        return lock

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._mutex:
                self._held = [lock for lock in self._held if not lock.released]
                held = list(self._held)
            for lock in held:
                lock.refresh()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Extraction:
    """One ``gpfm-engine extract`` run over many slides (see the module docstring)."""

    def __init__(self, engine: "Engine", store: FeatureStore, runlog: "RunLog | None", reporter: "Reporter",
                 options: RunOptions | None = None) -> None:
        self.engine, self.store, self.runlog, self.reporter = engine, store, runlog, reporter
        self.options = options or RunOptions()
        self.records: list[SlideRecord] = []
        self._stop = threading.Event()
        self._heartbeat: _Heartbeat | None = None

    # --- the prefetch stage (runs in its own thread)
    def _prepare(self, job: SlideJob) -> _Prepared | SlideRecord:
        t0 = time.perf_counter()
        path = str(job.path)
        record = lambda status, **kw: SlideRecord(job.name, path, status, **kw)  # noqa: E731
        if self.options.dry_run:
            return self._plan_only(job, record)
        lock = slide = None
        try:
            recipe = self.engine.recipe(job.input.mpp)
            decision = self.store.decide(job.name, recipe, self.options.overwrite)
            if decision.action is Action.SKIP:
                locks.clear_stale(self.store.paths(job.name).lock)  # left by a process killed after its commit
                return record(Status.SKIPPED, patches=self._existing_rows(job.name), detail=decision.reason)
            if decision.action is Action.REFUSE:
                return record(Status.REFUSED, error=decision.reason)
            lock = self.store.lock(job.name)
            if lock is not None and self._heartbeat is not None:
                self._heartbeat.hold(lock)
            if lock is None:
                owner = locks.holder(self.store.paths(job.name).lock)
                return record(Status.BUSY, detail=f"locked by {owner.describe() if owner else 'another process'}")
            # Another process may have finished the slide between our decision and our lock.
            if self.store.decide(job.name, recipe, self.options.overwrite).action is Action.SKIP:
                lock.release()
                return record(Status.SKIPPED, patches=self._existing_rows(job.name), detail="done by another process")
            slide = self.engine.open(job.path, job.input.mpp)
            plan = self.engine.plan(slide)
            self._write_qc(job, plan)
            plan.mask = None  # the mask is only needed for the QC picture; free it early
            return _Prepared(job, plan, lock, recipe, t0, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            if slide is not None:
                slide.close()
            if lock is not None:
                lock.release()
            return record(Status.FAILED, error=_slide_error(path, exc), seconds=time.perf_counter() - t0)

    def _plan_only(self, job: SlideJob, record: Callable[..., SlideRecord]) -> SlideRecord:
        t0 = time.perf_counter()
        try:
            with self.engine.open(job.path, job.input.mpp) as slide:
                plan = self.engine.plan(slide)
                self._write_qc(job, plan)
                g = plan.grid
                detail = (f"level {int(g.read_level)}, {float(g.patch_size_read):.1f} px read, "
                          f"{float(g.mpp_effective):.3f} um/px")
                return record(Status.PLANNED, patches=plan.num_patches, detail=detail,
                              seconds=time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            return record(Status.FAILED, error=_slide_error(str(job.path), exc), seconds=time.perf_counter() - t0)

    def _write_qc(self, job: SlideJob, plan: "SlidePlan") -> None:
        if self.options.qc_dir is None:
            return
        from gpfm_engine import qc

        try:
            qc.write_qc(self.options.qc_dir / f"{job.name}.png", plan.mask, plan.grid)
        except Exception as exc:  # noqa: BLE001 - a QC picture never fails a slide
            log.warning("%s: QC picture not written: %s", job.path, one_line(exc))

    def _existing_rows(self, name: str) -> int:
        import h5py

        try:
            with h5py.File(self.store.paths(name).h5, "r") as f:
                return int(f["coords"].shape[0])
        except (OSError, KeyError):
            return 0

    def _prefetch(self, jobs: Sequence[SlideJob], out: "queue.Queue[Any]") -> None:
        try:
            for job in jobs:
                if self._stop.is_set():
                    break
                item = self._prepare(job)
                while not self._stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                else:
                    _discard(item)
        except BaseException as exc:  # noqa: BLE001 - a bug here must stop the run, not truncate it
            out.put(exc)
        finally:
            out.put(_END)

    # --- the main loop
    def run(self, jobs: Sequence[SlideJob]) -> list[SlideRecord]:
        t_run = time.perf_counter()
        self.reporter.run_started(len(jobs), {"model": self.engine.model_name, "device": str(self.engine.device)})
        prepared: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.options.pipeline.prefetch_slides))
        prefetcher = threading.Thread(target=self._prefetch, args=(jobs, prepared), name="gpfm-prefetch", daemon=True)
        writer = None if self.options.dry_run else _Writer(self.store, self.options.pipeline.writer_queue)
        pool = ThreadPoolExecutor(self.engine.workers, thread_name_prefix="gpfm-decode")
        self._heartbeat = _Heartbeat()
        prefetcher.start()
        try:
            while True:
                item = prepared.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, SlideRecord):
                    self._finish(item)
                else:
                    self._extract(item, writer, pool)
                self._drain(writer)
        finally:
            self._stop.set()
            while prefetcher.is_alive() or not prepared.empty():  # unblock and clean up the prefetcher
                try:
                    _discard(prepared.get(timeout=0.1))
                except queue.Empty:
                    pass
            prefetcher.join()
            if writer is not None:
                writer.close()
                self._drain(writer)
            pool.shutdown(wait=True)
            self._heartbeat.close()
            self.reporter.close()
            if self.runlog is not None:
                self.runlog.flush(finished=True)
        order = {job.name: i for i, job in enumerate(jobs)}
        self.records.sort(key=lambda r: order.get(r.name, len(order)))  # the summary in input order
        self.reporter.run_finished(self.records, time.perf_counter() - t_run)
        return self.records

    def _extract(self, item: _Prepared, writer: _Writer, pool: ThreadPoolExecutor) -> None:
        job, plan = item.job, item.plan
        record = SlideRecord(job.name, str(job.path), Status.DONE)
        self.reporter.slide_started(job.name, plan.num_patches)
        t0 = time.perf_counter()
        committed = False
        try:
            attrs = dict(self.engine.meta(plan, job.name), **self.engine.model_meta(),
                         savetodir=str(self.store.h5_dir), source_fingerprint=job.fingerprint)
            writer.put("open", job, self.engine.feature_dim)
            for batch in stream_slide(self.engine, plan, pool, self.options.pipeline):
                writer.put("rows", batch.coords, to_host_async(batch.features))
                record.patches += len(batch.coords)
                record.tiles_skipped += batch.tiles_skipped
                self.reporter.batch_done(job.name, len(batch.coords))
                self._drain(writer)
            if plan.num_patches == 0:
                record.detail = f"{plan.grid.empty_reason or 'no patches'}: empty output written"
            elif record.tiles_skipped or attrs["mask_tiles_skipped"]:
                record.detail = (f"{record.tiles_skipped} corrupt tiles skipped, "
                                 f"{attrs['mask_tiles_skipped']} shown as background in the tissue mask")
            record.seconds = item.prepare_seconds + time.perf_counter() - t0
            writer.put("commit", attrs, item.recipe, record, item.lock)
            committed = True
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            record.status, record.error = Status.FAILED, _slide_error(str(job.path), exc)
            record.seconds = item.prepare_seconds + time.perf_counter() - t0
        finally:
            if not committed:
                writer.put("abort", record, item.lock)
            plan.slide.close()

    def _drain(self, writer: _Writer | None) -> None:
        if writer is None:
            return
        while True:
            try:
                self._finish(writer.done.get_nowait())
            except queue.Empty:
                return

    def _finish(self, record: SlideRecord) -> None:
        self.records.append(record)
        if self.runlog is not None:
            self.runlog.add(record)
        self.reporter.slide_finished(record)


def _slide_error(path: str, exc: BaseException) -> str:
    """The one error line of a failed slide, naming the file once."""
    line = one_line(exc)
    return line if path in line else f"{path}: {line}"


def _discard(item: Any) -> None:
    """Release what a prepared-but-never-run slide holds (its lock and open file)."""
    if isinstance(item, _Prepared):
        item.plan.slide.close()
        item.lock.release()
