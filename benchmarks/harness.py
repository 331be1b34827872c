"""Interleaved A/B measurement: the only way speed claims are made in gpfm-engine.

Why interleaved: the benchmark machine is shared and noisy. Timing the engine for a minute and
then the baseline for a minute lets a neighbour's job land on one side only. Running them as
A B A B … (after a warm-up of each) exposes both to the same noise, and the per-pair ratio
``baseline / engine`` cancels most of it. We report the median ratio with its min and max;
absolute times and rates are printed only as context.

The API (everything a stage benchmark needs)::

    from benchmarks.harness import BenchContext, Comparison, Skipped, compare

    def run(ctx: BenchContext) -> list[Comparison]:          # benchmarks/bench_<stage>.py
        slide = ctx.large_slide()                            # cached synthesized 40k x 30k JPEG pyramid
        return [compare("read+decode", engine_fn, baseline_fn,
                        repeats=ctx.repeats, warmup=ctx.warmup,
                        work=n_tiles, units="tiles", goal=5.0,
                        note="tiff raw tiles + libjpeg-turbo threads vs OpenSlide read_region")]

``compare(name, engine_fn, baseline_fn, repeats=5, warmup=1, work=None, units="runs", goal=None,
note="") -> Comparison`` calls zero-argument functions (``warmup`` times each, then ``repeats``
pairs A B A B …) and returns a ``Comparison``: ``ratio_median`` / ``ratio_min`` / ``ratio_max``
(``baseline / engine`` per pair, so 6.0 means the engine is 6x faster), ``met`` (ratio median vs
``goal``; ``None`` without a goal) and the raw per-call seconds. ``work`` is the amount of work
one call does (tiles, patches, slides), used only for the context rates. ``compare_all(name,
engine_fn, {"CLAM-style": fa, "TRIDENT-style": fb}, ...)`` interleaves several baselines in the
same rounds (engine, a, b, engine, a, b, …) and returns one ``Comparison`` per baseline;
``interleave({label: fn, ...})`` is the primitive under both (raw seconds per label and round).

Non-timing comparisons (peak memory) build a ``Comparison`` directly with ``metric="MiB"`` and
``ratio="growth"`` (engine / baseline, lower is better, goal is a maximum).

Outputs: ``render_markdown(results)`` (ratios first), ``write_json(results, path)`` and
``append_results(results, command)`` which adds a dated section with machine info to
``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

log = logging.getLogger(__name__)

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

RatioKind = Literal["speedup", "growth"]


@dataclass
class Comparison:
    """One engine-vs-baseline result: per-repeat values of each side and the ratios they give.

    ``engine[i]`` and ``baseline[i]`` were measured back to back (pair i). For ``ratio="speedup"``
    the ratio of pair i is ``baseline[i] / engine[i]`` (higher is better, ``goal`` is a minimum);
    for ``ratio="growth"`` it is ``engine[i] / baseline[i]`` (lower is better, ``goal`` a maximum).
    """

    name: str
    engine: list[float]
    baseline: list[float]
    metric: str = "s"
    ratio: RatioKind = "speedup"
    work: float | None = None
    units: str = "runs"
    goal: float | None = None
    note: str = ""
    engine_label: str = "engine"
    baseline_label: str = "baseline"
    context: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.engine) != len(self.baseline) or not self.engine:
            raise ValueError(f"{self.name}: need the same non-zero number of engine and baseline values")
        if self.ratio not in ("speedup", "growth"):
            raise ValueError(f"{self.name}: ratio must be 'speedup' or 'growth', not {self.ratio!r}")

    @property
    def ratios(self) -> list[float]:
        """Per-pair ratios (see the class docstring for the direction)."""
        num, den = (self.baseline, self.engine) if self.ratio == "speedup" else (self.engine, self.baseline)
        return [n / d if d > 0 else float("inf") for n, d in zip(num, den)]

    @property
    def ratio_median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_min(self) -> float:
        return min(self.ratios)

    @property
    def ratio_max(self) -> float:
        return max(self.ratios)

    @property
    def met(self) -> bool | None:
        """Whether the median ratio reaches the goal (``None`` when there is no goal)."""
        if self.goal is None:
            return None
        return self.ratio_median >= self.goal if self.ratio == "speedup" else self.ratio_median <= self.goal

    def rate(self, side: Literal["engine", "baseline"]) -> float | None:
        """``work`` per second at the median time of one side (context only; seconds metric only)."""
        values = self.engine if side == "engine" else self.baseline
        med = statistics.median(values)
        if self.work is None or self.metric != "s" or med <= 0:
            return None
        return self.work / med

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: the inputs plus the derived ratios, goal verdict and rates."""
        d = asdict(self)
        d.update(
            ratios=self.ratios,
            ratio_median=self.ratio_median,
            ratio_min=self.ratio_min,
            ratio_max=self.ratio_max,
            met=self.met,
            engine_median=statistics.median(self.engine),
            baseline_median=statistics.median(self.baseline),
            engine_rate=self.rate("engine"),
            baseline_rate=self.rate("baseline"),
        )
        return d


@dataclass(frozen=True)
class Skipped:
    """A stage or comparison that could not run here, and the one-line reason (shown in the table)."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "skipped": self.reason}


Result = Comparison | Skipped


def _sync_device() -> None:
    """Wait for queued CUDA work (GPU calls return early); a no-op where torch/CUDA is not in use."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    gc.collect()  # outside the timed region: neither side pays for the other's garbage
    _sync_device()
    t0 = clock()
    fn()
    _sync_device()
    return clock() - t0


def compare(
    name: str,
    engine_fn: Callable[[], object],
    baseline_fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    *,
    work: float | None = None,
    units: str = "runs",
    goal: float | None = None,
    note: str = "",
    engine_label: str = "engine",
    baseline_label: str = "baseline",
    clock: Callable[[], float] = time.perf_counter,
) -> Comparison:
    """Time ``engine_fn`` and ``baseline_fn`` interleaved and return their ``Comparison``.

    Order of calls: ``warmup`` x (engine, baseline) unrecorded, then ``repeats`` x (engine,
    baseline) recorded. ``clock`` is injectable so tests can check the logic without timing.
    """
    (c,) = compare_all(name, engine_fn, {baseline_label: baseline_fn}, repeats, warmup, work=work, units=units,
                       goal=goal, note=note, engine_label=engine_label, clock=clock, suffix=False)
    return c


def interleave(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    *,
    name: str = "",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """The primitive under ``compare``: rounds of every function in order, seconds per call.

    ``warmup`` unrecorded rounds, then ``repeats`` recorded ones; returns ``{label: [seconds of
    round 0, round 1, …]}``. Use it directly when one round holds more than an engine and its
    baselines (e.g. two engine configurations against the same baselines).
    """
    if repeats < 1 or warmup < 0 or not fns:
        raise ValueError(f"{name}: repeats must be >= 1, warmup >= 0, and at least one function given")
    for i in range(warmup):
        log.info("%s: warm-up %d/%d", name, i + 1, warmup)
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for i in range(repeats):
        for label, fn in fns.items():
            times[label].append(_timed(fn, clock))
        log.info("%s: round %d/%d %s", name, i + 1, repeats,
                 " ".join(f"{label} {v[-1]:.3f}s" for label, v in times.items()))
    return times


def compare_all(
    name: str,
    engine_fn: Callable[[], object],
    baselines: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    *,
    work: float | None = None,
    units: str = "runs",
    goal: float | None = None,
    note: str = "",
    engine_label: str = "engine",
    clock: Callable[[], float] = time.perf_counter,
    suffix: bool = True,
) -> list[Comparison]:
    """Like ``compare`` with several baselines: rounds of engine, baseline 1, baseline 2, ….

    Returns one ``Comparison`` per baseline (named ``"<name> vs <label>"``), each pairing a
    baseline's value in round i with the engine's value in the same round.
    """
    if not baselines or engine_label in baselines:
        raise ValueError(f"{name}: give at least one baseline, none labelled {engine_label!r}")
    times = interleave({engine_label: engine_fn, **baselines}, repeats, warmup, name=name, clock=clock)
    return [Comparison(f"{name} vs {label}" if suffix else name, times[engine_label], times[label], work=work,
                       units=units, goal=goal, note=note, engine_label=engine_label, baseline_label=label)
            for label in baselines]


# --- context handed to stage benchmarks -----------------------------------------------------------


@dataclass
class BenchContext:
    """What a stage benchmark's ``run(ctx)`` gets: the suite, the repeat counts and the inputs.

    ``threads`` is the thread budget both sides get (engine threads, torch intra-op threads,
    DataLoader workers). Inputs are produced lazily and cached (see ``benchmarks/data.py``).
    """

    suite: Literal["cpu", "gpu"] = "cpu"
    repeats: int = 5
    warmup: int = 1
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    quick: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.suite == "gpu" else "cpu"

    def large_slide(self) -> Path:
        """The cached large synthesized JPEG pyramid (generated on first use)."""
        from benchmarks import data

        return data.large_slide(quick=self.quick)

    def real_slides(self) -> list[Path]:
        """Real third-party slides from ../shared/data that OpenSlide opens (may be empty)."""
        from benchmarks import data

        return data.real_slides()


# --- machine info and outputs ---------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """Short HEAD, with ``+dirty`` when tracked files differ from it (results then describe more)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        return (head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were measured: CPU, cores, memory, load, versions, commit."""
    import psutil

    from gpfm_engine.environment import versions

    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
        "versions": versions(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def _fmt_side(c: Comparison, side: Literal["engine", "baseline"]) -> str:
    values = c.engine if side == "engine" else c.baseline
    med = statistics.median(values)
    text = f"{med:.3f} s" if c.metric == "s" else f"{med:.1f} {c.metric}"
    rate = c.rate(side)
    if rate is not None:
        text += f" ({rate:,.1f} {c.units}/s)"
    return text


def render_markdown(results: Sequence[Result]) -> str:
    """A markdown table with the ratios first, then the goal, then absolute figures as context."""
    head = ("| comparison | ratio (median) | min | max | goal | met | engine | baseline | n | note |\n"
            "|---|---:|---:|---:|---|---|---|---|---:|---|")
    rows = [head]
    for r in results:
        if isinstance(r, Skipped):
            rows.append(f"| {r.name} | – | – | – | – | skipped | – | – | – | {r.reason} |")
            continue
        sign = ">=" if r.ratio == "speedup" else "<="
        goal = f"{sign} {r.goal:g}x" if r.goal is not None else "–"
        met = {True: "yes", False: "**no**", None: "–"}[r.met]
        kind = "" if r.ratio == "speedup" else f" ({r.engine_label}/{r.baseline_label})"
        rows.append(
            f"| {r.name} | {_fmt_ratio(r.ratio_median)}{kind} | {_fmt_ratio(r.ratio_min)} | "
            f"{_fmt_ratio(r.ratio_max)} | {goal} | {met} | {_fmt_side(r, 'engine')} | "
            f"{_fmt_side(r, 'baseline')} | {len(r.engine)} | {r.note} |"
        )
    return "\n".join(rows)


def to_json(results: Sequence[Result], machine: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The whole run as one JSON-ready dict: machine info, extra fields, every result record."""
    return {"machine": machine if machine is not None else machine_info(), **extra,
            "results": [r.to_dict() for r in results]}


def write_json(results: Sequence[Result], path: str | os.PathLike, machine: dict[str, Any] | None = None,
               **extra: Any) -> Path:
    """Write ``to_json(...)`` to ``path`` (parents created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(results, machine, **extra), indent=2, default=str) + "\n")
    return out


def render_section(results: Sequence[Result], command: str, machine: dict[str, Any]) -> str:
    """One dated RESULTS.md section: heading, command, machine, table."""
    v = machine.get("versions", {})
    lines = [
        f"## {machine['date']} — {machine['cpu']}, {machine['cores_usable']} usable cores",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}; {machine['cores_logical']} logical / {machine['cores_usable']} usable "
        f"cores; {machine['memory_gib']} GiB RAM; load average at start {machine['load_avg']}"
        + (f", at end {machine['load_avg_end']}" if "load_avg_end" in machine else "") + "; "
        f"commit {machine['git_commit']}; gpfm-engine {v.get('gpfm-engine', '?')}, Python {v.get('python', '?')}, "
        f"torch {v.get('torch', '?')} ({machine.get('torch_threads', '?')} threads), numpy {v.get('numpy', '?')}, "
        f"openslide {v.get('openslide', '?')}" + (f"; GPU {machine['gpu']}" if "gpu" in machine else "") + ".",
        "",
        render_markdown(results),
        "",
    ]
    return "\n".join(lines)


def append_results(results: Sequence[Result], command: str, path: str | os.PathLike = RESULTS_MD,
                   machine: dict[str, Any] | None = None, notes: str = "") -> Path:
    """Append a dated section (machine info, command, table, optional notes) to RESULTS.md."""
    out = Path(path)
    section = render_section(results, command, machine if machine is not None else machine_info())
    if notes:
        section += "\n" + notes.strip() + "\n"
    if not out.exists():
        out.write_text("# gpfm-engine benchmark results\n\nRatios are measured interleaved in one run "
                       "(see benchmarks/harness.py); absolute figures are context only.\n\n")
    with out.open("a") as f:
        f.write("\n" + section)
    return out
