"""``python -m benchmarks`` (or ``gpfm-engine bench``): every stage, engine vs baseline, one run.

Each stage is a module ``benchmarks/bench_<stage>.py`` exposing ``run(ctx: BenchContext) ->
list[Comparison | Skipped]``. A stage whose module is missing, or whose engine side is not built
yet, is reported as skipped with the reason instead of stopping the run. The table printed last
puts the ratios first; ``--record`` appends it with machine info to ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
import time
from typing import Sequence

from benchmarks.harness import BenchContext, Result, Skipped, append_results, machine_info, render_markdown, write_json

log = logging.getLogger("benchmarks")

# (stage name as printed, module under benchmarks/), in pipeline order
STAGES: tuple[tuple[str, str], ...] = (
    ("read+decode", "bench_read"),
    ("tissue mask+grid", "bench_tissue"),
    ("preprocess", "bench_preprocess"),
    ("model", "bench_model"),
    ("end-to-end", "bench_e2e"),
    ("memory", "bench_memory"),
)


def run_stage(stage: str, module: str, ctx: BenchContext) -> list[Result]:
    """Import and run one stage; any failure becomes a one-line ``Skipped`` (traceback with -v)."""
    try:
        mod = importlib.import_module(f"benchmarks.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"benchmarks.{module}":
            return [Skipped(stage, f"benchmarks/{module}.py is not there yet")]
        log.debug("importing %s failed", module, exc_info=True)
        return [Skipped(stage, f"cannot import benchmarks/{module}.py: {exc}")]
    except ImportError as exc:
        log.debug("importing %s failed", module, exc_info=True)
        return [Skipped(stage, f"cannot import benchmarks/{module}.py: {exc}")]
    try:
        return list(mod.run(ctx))
    except Exception as exc:  # noqa: BLE001 - one broken stage must not lose the others' results
        log.warning("stage %s failed", stage, exc_info=log.isEnabledFor(logging.DEBUG))
        return [Skipped(stage, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")]


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="gpfm-engine vs PyTorch baselines, measured interleaved in one run.")
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu", help="device of the engine and baselines")
    p.add_argument("--stage", action="append", choices=[m.removeprefix("bench_") for _, m in STAGES],
                   help="run only these stages (repeatable); default all")
    p.add_argument("--repeats", type=int, default=5, help="measured A/B pairs per comparison (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded A/B pairs first (default 1)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="thread budget of both sides (default: usable cores)")
    p.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats: a smoke run")
    p.add_argument("--slide-size", help="large slide size, e.g. 40000x30000 (default 40000x30000; cached)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write all records and machine info as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="draw the ratios as a bar chart (PNG)")
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v progress of each pair, -vv tracebacks")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "python -m benchmarks") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose + 1, 2),
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if args.slide_size:
        os.environ["GPFM_BENCH_SLIDE_SIZE"] = args.slide_size
    import torch

    torch.set_num_threads(args.threads)
    if args.suite == "gpu" and not torch.cuda.is_available():
        print(f"{prog}: --suite gpu needs a CUDA device; none is visible here", file=sys.stderr)
        return 2
    ctx = BenchContext(suite=args.suite, repeats=2 if args.quick else args.repeats,
                       warmup=args.warmup, threads=args.threads, quick=args.quick)
    machine = machine_info()
    wanted = set(args.stage or [m.removeprefix("bench_") for _, m in STAGES])
    results: list[Result] = []
    t0 = time.perf_counter()
    for stage, module in STAGES:
        if module.removeprefix("bench_") not in wanted:
            continue
        log.info("stage %s", stage)
        results += run_stage(stage, module, ctx)
    elapsed = time.perf_counter() - t0
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: say how busy
    command = " ".join([prog, *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    if args.json_out:
        write_json(results, args.json_out, machine, command=command, suite=args.suite, seconds=elapsed)
    if args.plot:
        from benchmarks.plot import plot_ratios

        plot_ratios(results, args.plot, title=f"gpfm-engine vs PyTorch baselines ({args.suite}, {machine['cpu']}, "
                                              f"{args.threads} threads)")
    if args.record:
        append_results(results, command, machine=machine)
    print(f"\n{args.suite} suite, {args.threads} threads, {machine['cpu']}, {elapsed:.0f} s; "
          "ratio = baseline time / engine time (higher is better) unless marked")
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
