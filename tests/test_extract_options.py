"""``gpfm-engine extract --compile/--no-compile --cuda-graphs/--no-cuda-graphs`` reach the Engine
(unset = auto), an impossible request is a one-line usage error, and ``run_extract(engine=...)``
reuses one engine (its compiled model and captured graphs) across runs."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from _pipeline_utils import TINY, tiny_weights  # noqa: F401 - fixture
from gpfm_engine.cli import main


@pytest.fixture
def engine_kwargs(monkeypatch) -> list[dict]:
    import gpfm_engine.engine as engine_module

    seen: list[dict] = []
    real = engine_module.Engine

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", spy)
    return seen


def extract(*args, weights: Path) -> tuple[int, str]:
    argv = ["extract", *map(str, args), "--model", "gpfm-tiny", "--weights", str(weights), "--device", "cpu",
            "--batch-size", "8", "--workers", "2", "--quiet"]
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    return result.exit_code, result.output


def test_flags_reach_the_engine(slide_factory, tiny_weights: Path, tmp_path: Path, engine_kwargs) -> None:
    slide = slide_factory(**TINY, seed=21)
    for flags, expected in (([], (None, None)), (["--compile"], (True, None)),
                            (["--no-compile", "--no-cuda-graphs"], (False, False))):
        code, text = extract(slide, "--out", tmp_path / "out", "--dry-run", *flags, weights=tiny_weights)
        assert code == 0, text
        assert (engine_kwargs[-1]["compile"], engine_kwargs[-1]["cuda_graphs"]) == expected


def test_cuda_graphs_on_cpu_is_a_usage_error(slide_factory, tiny_weights: Path, tmp_path: Path) -> None:
    code, text = extract(slide_factory(**TINY, seed=21), "--out", tmp_path / "out", "--cuda-graphs",
                         weights=tiny_weights)
    assert code == 2
    assert "error: CUDA graphs need a CUDA device, not cpu" in text and "Traceback" not in text


def test_run_extract_reuses_an_engine(slide_factory, tiny_weights: Path, tmp_path: Path, engine_kwargs) -> None:
    from gpfm_engine import Engine
    from gpfm_engine.extract import ExtractRequest, run_extract

    slide = slide_factory(**TINY, seed=21)
    engine = Engine(model="gpfm-tiny", weights=tiny_weights, device="cpu", batch_size=8, workers=2)
    backend = engine.backend
    for out in ("a", "b"):
        req = ExtractRequest(slides=[str(slide)], out=tmp_path / out, model="gpfm-tiny", quiet=True)
        assert run_extract(req, engine=engine) == 0
        assert (tmp_path / out / "h5_files" / f"{slide.stem}.h5").exists()
    assert engine_kwargs == [] and engine.backend is backend  # no second engine, no second backend
