"""The ``gpfm-engine`` command line. Each command is a thin shell over a library function."""
from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console
from rich.table import Table

from gpfm_engine import __version__

console = Console(stderr=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gpfm-engine")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Whole-slide images to GPFM foundation-model features."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # tifffile warns about the same damaged files our one-line errors describe
        logging.getLogger("tifffile").setLevel(logging.ERROR)


def _print_environment(as_json: bool) -> None:
    from gpfm_engine.environment import report

    data = report()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    versions = Table(title="gpfm-engine", show_header=False)
    for k, v in data["versions"].items():
        versions.add_row(k, str(v))
    console.print(versions)
    build = Table(title="compiled extension (gpfm_engine._core)", show_header=False)
    for k, v in data["build"].items():
        build.add_row(k, str(v))
    console.print(build)
    for section in ("slide_readers", "decoders", "backends"):
        t = Table(title=section.replace("_", " "))
        for col in ("name", "available", "detail", "purpose"):
            t.add_column(col)
        for row in data[section]:
            t.add_row(row["name"], "yes" if row["available"] else "no", row["detail"], row["purpose"])
        console.print(t)


@main.command()
@click.argument("slides", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(slides: tuple[str, ...], as_json: bool) -> None:
    """Describe this installation, or the given SLIDES."""
    if not slides:
        _print_environment(as_json)
        return
    from gpfm_engine.errors import SlideError
    from gpfm_engine.slide.describe import describe_slide, description_table

    described, failed = [], 0
    for path in slides:
        try:
            described.append(describe_slide(path))
        except SlideError as exc:  # one line per bad slide; the others are still described
            failed += 1
            click.echo(f"error: {exc}", err=True)
    if as_json:
        click.echo(json.dumps(described, indent=2))
    else:
        for item in described:
            console.print(description_table(item))
    if failed:
        sys.exit(1)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Engine vs PyTorch baselines (source checkout only; options: gpfm-engine bench --help)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]  # benchmarks/ sits beside the package, not inside it
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise click.ClickException("the benchmarks ship with the source checkout only; run this from one "
                                   "(pip install -e .) or use `python -m benchmarks` there")
    sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as run_benchmarks

    sys.exit(run_benchmarks(ctx.args, prog="gpfm-engine bench"))


@main.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--model", "model_name", default="gpfm", show_default=True, help="Registered model name.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Weights file (else env / HF cache).")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16", "fp8"]), default="fp32", show_default=True,
              help="Graph precision (bf16/fp16/fp8 graphs are for TensorRT).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18; fp8 needs >= 19).")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check.")
def export(out: str, model_name: str, weights: str | None, fmt: str, precision: str, opset: int | None,
           no_verify: bool) -> None:
    """Export a model to OUT (dynamic batch, fixed input size, pos-embed baked in)."""
    from gpfm_engine.errors import GpfmError
    from gpfm_engine.export import DEFAULT_OPSET, export_model

    try:
        path = export_model(model_name, out, weights=weights, fmt=fmt, precision=precision,
                            opset=opset or DEFAULT_OPSET, verify=not no_verify)
    except GpfmError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(path))


from gpfm_engine.extract import extract_command  # noqa: E402 - the command and its logic live in extract.py

main.add_command(extract_command)


if __name__ == "__main__":  # pragma: no cover
    main()
