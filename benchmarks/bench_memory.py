"""Peak memory of ``gpfm-engine extract`` over 200 small slides vs 20: it must stay flat.

Each run is its own process (a fresh interpreter, a fresh output folder); its peak RSS is the
``ru_maxrss`` the kernel reports for it (and any children it waited for) through ``os.wait4`` in a
small launcher process, so no sampling can miss a spike. The 200- and 20-slide runs alternate, like timed pairs. The ratio is
``peak(200) / peak(20)``: a per-slide leak of even 1 MiB shows as a ratio well above the goal.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from benchmarks import data, model_choice
from benchmarks.harness import BenchContext, Comparison, Result, Skipped

GOAL = 1.10
MANY, FEW = 200, 20
QUICK_MANY, QUICK_FEW = 40, 4
REPEATS = 3  # RSS is nearly deterministic, and each 200-slide run takes minutes


def extract_command(slides: Sequence[Path], out: Path, choice: model_choice.ModelChoice, device: str,
                    threads: int) -> list[str]:
    """The user's command line: ``gpfm-engine extract SLIDES --out DIR`` with the benchmark model."""
    cmd = [sys.executable, "-m", "gpfm_engine.cli", "extract", *map(str, slides), "--out", str(out),
           "--model", choice.name, "--device", device, "--backend", "torch", "--precision", "fp32",
           "--workers", str(threads), "--quiet"]
    if choice.weights is not None:
        cmd += ["--weights", str(choice.weights)]
    return cmd


# Runs argv[1:] and prints its peak RSS in KiB. Why a launcher: a child forked from this (large,
# torch-importing) process would inherit our RSS high-water mark, which survives its exec.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to completion; return (its peak RSS in MiB, wall seconds). Raises on failure."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    try:
        kib, code = (int(v) for v in done.stdout.split())
    except ValueError:
        code, kib = done.returncode or 1, 0
    if code != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"extract exited with {code}: {tail[0]}")
    return kib / 1024.0, seconds  # Linux reports KiB


def _extract_available() -> str | None:
    probe = subprocess.run([sys.executable, "-m", "gpfm_engine.cli", "extract", "--help"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else "`gpfm-engine extract` is not there yet (pipeline issue)"


def run(ctx: BenchContext) -> list[Result]:
    name = "peak RSS, 200 vs 20 slides"
    missing = _extract_available()
    if missing:
        return [Skipped(name, missing)]
    many, few = (QUICK_MANY, QUICK_FEW) if ctx.quick else (MANY, FEW)
    slides = data.small_slides(many)
    choice = model_choice.choose()
    rss = {many: [], few: []}
    secs = {many: [], few: []}
    for _ in range(1 if ctx.quick else REPEATS):
        for n in (many, few):
            with tempfile.TemporaryDirectory(prefix="gpfm-bench-mem-") as out:
                mib, s = peak_rss_mib(extract_command(slides[:n], Path(out), choice, ctx.device, ctx.threads))
            rss[n].append(mib)
            secs[n].append(s)
    return [Comparison(
        f"peak RSS, {many} vs {few} slides", engine=rss[many], baseline=rss[few], metric="MiB", ratio="growth",
        goal=GOAL, engine_label=f"{many} slides", baseline_label=f"{few} slides",
        note=f"gpfm-engine extract, {data.SMALL[0]}x{data.SMALL[1]} px slides, {choice.note}",
        context={"seconds": secs, "slides": {"many": many, "few": few}})]
