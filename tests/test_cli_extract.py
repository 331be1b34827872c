"""``gpfm-engine extract``: outputs TRIDENT/CLAM readers take, resume/skip/refuse, crash safety
(SIGKILL), two processes on one folder, and every failure class costing only its own slide."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _pipeline_utils import TINY, tiny_weights  # noqa: F401 - fixture
from gpfm_engine.cli import main
from gpfm_engine.store import FeatureStore, read_features

TRIDENT_ATTRS = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                 "level0_width", "level0_height", "name")
OUR_ATTRS = ("mpp_level0", "mpp_target", "mpp_effective", "read_level", "fov_um", "encoder", "weights_sha256",
             "precision", "backend", "engine_version", "recipe_sha256", "tiles_skipped", "mask_tiles_skipped")


@pytest.fixture(scope="module")
def slides(slide_factory) -> list[Path]:
    return [slide_factory(**TINY, seed=21), slide_factory(**TINY, seed=22, fmt="tiff", compression="lzw")]


def extract(args: list, weights: Path, expect: int | None = 0) -> tuple[int, str]:
    """Run the command in-process; returns (exit code, stdout + stderr)."""
    argv = ["extract", *map(str, args), "--model", "gpfm-tiny", "--weights", str(weights), "--device", "cpu",
            "--batch-size", "8", "--workers", "2"]
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result.exit_code, result.output


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_outputs_trident_and_clam_read(slides, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _, text = extract([*slides, "--out", out, "--formats", "h5,pt", "--qc"], tiny_weights)
    assert "gpfm-engine extract" in text and "2 done" in text  # the summary table
    for slide in slides:
        h5 = out / "h5_files" / f"{slide.stem}.h5"
        with h5py.File(h5, "r") as f:  # as TRIDENT's read_coords / feature loaders do
            feats, coords = f["features"][()], f["coords"][()]
            attrs = dict(f["coords"].attrs)
            assert f["features"].attrs["encoder"] == "gpfm-tiny"
        assert feats.dtype == np.float32 and coords.dtype == np.int64 and feats.shape == (len(coords), 192)
        assert all(k in attrs for k in TRIDENT_ATTRS + OUR_ATTRS)
        assert attrs["patch_size_level0"] == 256 and attrs["level0_width"] == 1000 and attrs["name"] == slide.stem
        assert attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"] == pytest.approx(256)
        pt = torch.load(out / "pt_files" / f"{slide.stem}.pt", weights_only=True)  # CLAM's MIL datasets
        assert torch.equal(pt, torch.from_numpy(feats))
        assert (out / "qc" / f"{slide.stem}.png").stat().st_size > 0
    rows = run_json(out)["slides"]
    assert {r["status"] for r in rows.values()} == {"done"}
    assert all(r["patches"] > 0 and r["seconds"] > 0 and r["error"] is None for r in rows.values())
    assert run_json(out)["totals"]["done"] == 2


def test_resume_skip_refuse_overwrite(slides, tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extract([slides[0], "--out", out], tiny_weights)
    first = read_features(out / "h5_files" / f"{slides[0].stem}.h5")
    _, text = extract([slides[0], "--out", out], tiny_weights)
    assert "1 skipped" in text
    code, text = extract([slides[0], "--out", out, "--fov-um", "100"], tiny_weights, expect=1)
    assert "refused" in text and "geometry.fov_um" in text and "--overwrite" in text
    np.testing.assert_array_equal(read_features(out / "h5_files" / f"{slides[0].stem}.h5")[0], first[0])
    extract([slides[0], "--out", out, "--fov-um", "100", "--overwrite"], tiny_weights)
    assert read_features(out / "h5_files" / f"{slides[0].stem}.h5")[2]["fov_um"] == 100.0
    # float16 storage is part of the recipe as well
    extract([slides[1], "--out", tmp_path / "half", "--features-dtype", "float16"], tiny_weights)
    assert read_features(tmp_path / "half" / "h5_files" / f"{slides[1].stem}.h5")[0].dtype == np.float16


def test_failures_cost_only_their_slide(slides, slide_factory, tiny_weights: Path, tmp_path: Path) -> None:
    no_mpp = slide_factory(**dict(TINY, mpp=None), seed=24)
    empty = slide_factory(**dict(TINY, coverage=0.0), seed=24)
    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(b"II*\0" + os.urandom(3000))
    missing = tmp_path / "missing.svs"
    out = tmp_path / "out"
    code, text = extract([no_mpp, garbage, missing, empty, slides[0], "--out", out, "--quiet"], tiny_weights, expect=1)
    rows = run_json(out)["slides"]
    assert rows[slides[0].stem]["status"] == "done"
    assert rows[empty.stem]["status"] == "done" and rows[empty.stem]["patches"] == 0  # explicit empty result
    with h5py.File(out / "h5_files" / f"{empty.stem}.h5", "r") as f:
        assert f["features"].shape == (0, 192) and f["coords"].shape == (0, 2)
    for bad in (no_mpp, garbage, missing):
        row = rows[bad.stem]
        assert row["status"] == "failed" and row["error"].startswith(str(bad)) and "\n" not in row["error"]
        assert row["error"] in text  # one error line per failed slide, printed
        assert not (out / "h5_files" / f"{bad.stem}.h5").exists()
    assert "mpp" in rows[no_mpp.stem]["error"]
    assert not list((out / "locks").iterdir())
    extract([no_mpp, garbage, "--out", out, "--quiet", "--allow-failures"], tiny_weights, expect=0)
    extract([no_mpp, "--out", out, "--mpp", "0.5", "--quiet"], tiny_weights)  # the override rescues it
    assert run_json(out)["slides"][no_mpp.stem]["status"] == "done"


def test_unicode_paths_collisions_csv_limit_dry_run(slide_factory, tiny_weights: Path, tmp_path: Path) -> None:
    src = slide_factory(**TINY, seed=25)
    a, b = tmp_path / "données" / "a", tmp_path / "données" / "b"
    a.mkdir(parents=True), b.mkdir(parents=True)
    (a / "切片 ü.svs").write_bytes(src.read_bytes())
    (b / "切片 ü.svs").write_bytes(slide_factory(**TINY, seed=26).read_bytes())
    listing = tmp_path / "données" / "list.csv"
    listing.write_text("path,mpp\na/切片 ü.svs,\nb/切片 ü.svs,0.5\n", encoding="utf-8")
    out = tmp_path / "sortie ü"
    _, text = extract([listing, "--out", out, "--log-json"], tiny_weights)
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "slide_finished"]
    assert [e["status"] for e in done] == ["done", "done"]
    names = sorted(p.name for p in (out / "h5_files").iterdir())
    assert names[0] == "切片 ü-" + names[0][len("切片 ü-"):] and len(names) == 2 and "切片 ü.h5" in names
    # --dry-run computes the grid only; --limit takes the first slides
    dry = tmp_path / "dry"
    _, text = extract([a, b, "--out", dry, "--dry-run", "--limit", "1", "--log-json"], tiny_weights)
    finished = [json.loads(line) for line in text.splitlines() if '"slide_finished"' in line]
    assert len(finished) == 1 and finished[0]["status"] == "planned" and finished[0]["patches"] > 0
    assert not list((dry / "h5_files").iterdir())


@pytest.fixture
def readonly_dir(tmp_path: Path):
    """A folder no process can write to (chmod for users; a read-only tmpfs for root)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only file system")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_read_only_output_folder(slides, tiny_weights: Path, readonly_dir: Path) -> None:
    code, text = extract([slides[0], "--out", readonly_dir / "out"], tiny_weights, expect=2)
    assert "not writable" in text and str(readonly_dir) in text


# --- separate processes: SIGKILL at any moment, two processes on one folder ------------------------


def command(slides, out: Path, weights: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gpfm_engine.cli", "extract", *map(str, slides), "--out", str(out), "--model",
            "gpfm-tiny", "--weights", str(weights), "--device", "cpu", "--batch-size", "2", "--workers", "1", *extra]


def assert_nothing_half_done(out: Path, n_expected: dict[str, int]) -> None:
    """Every h5 (and .pt) a TRIDENT/CLAM reader would list is complete; the rest is temporary."""
    for h5 in (out / "h5_files").glob("*.h5"):
        feats, coords, attrs = read_features(h5)
        assert len(feats) == len(coords) == n_expected[h5.stem] and attrs["recipe_sha256"]
    for pt in (out / "pt_files").glob("*.pt"):
        assert len(torch.load(pt, weights_only=True)) == n_expected[pt.stem]
    for f in out.rglob("*"):
        assert f.is_dir() or f.suffix in (".h5", ".pt", ".json", ".tmp", ".lock"), f


def test_sigkill_at_any_moment_then_resume(slide_factory, tiny_weights: Path, tmp_path: Path) -> None:
    slides = [slide_factory(**TINY, seed=s) for s in (32, 33, 41)]
    clean = tmp_path / "clean"
    extract([*slides, "--out", clean, "--quiet"], tiny_weights)
    expected = {h5.stem: len(read_features(h5)[1]) for h5 in (clean / "h5_files").glob("*.h5")}
    out = tmp_path / "killed"
    # kill while the first slide's rows stream into its temporary file, then after the first commit
    for trigger in (lambda: list((out / "h5_files").glob("*.h5.tmp")), lambda: list((out / "h5_files").glob("*.h5"))):
        proc = subprocess.Popen(command(slides, out, tiny_weights, "--quiet", "--formats", "h5,pt"))
        deadline = time.monotonic() + 120
        while proc.poll() is None and not trigger() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_nothing_half_done(out, expected)
        store = FeatureStore(out, ("h5", "pt"))
        for s in slides:  # done for the resume rule only when complete in every requested format
            recipe = json.loads((clean / "recipes" / f"{s.stem}.json").read_text())["recipe"]
            done = store.decide(s.stem, recipe).action.value == "skip"
            assert done == ((out / "h5_files" / f"{s.stem}.h5").exists() and (out / "pt_files" / f"{s.stem}.pt").exists())
    # the next run takes over the dead process's locks and finishes the job
    subprocess.run(command(slides, out, tiny_weights, "--quiet", "--formats", "h5,pt"), check=True)
    for stem, n in expected.items():
        a, b = read_features(out / "h5_files" / f"{stem}.h5"), read_features(clean / "h5_files" / f"{stem}.h5")
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a[1], b[1])
    assert not list(out.rglob("*.tmp")) and not list((out / "locks").iterdir())


def test_two_processes_share_a_folder(slide_factory, tiny_weights: Path, tmp_path: Path) -> None:
    slides = [slide_factory(**TINY, seed=s) for s in (21, 22, 24)]
    out = tmp_path / "shared"
    procs = [subprocess.Popen(command(slides, out, tiny_weights, "--log-json"), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    finished = [json.loads(line) for text in outputs for line in text.splitlines() if '"slide_finished"' in line]
    computed = [e["name"] for e in finished if e["status"] == "done"]
    assert sorted(computed) == sorted(s.stem for s in slides)  # each slide written by exactly one process
    assert {e["status"] for e in finished} <= {"done", "skipped", "busy"}
    rows = run_json(out)["slides"]
    assert all(rows[s.stem]["status"] == "done" for s in slides)


def test_decoder_choice_reaches_the_engine(slides, tiny_weights: Path, tmp_path: Path, monkeypatch) -> None:
    """--decoder is handed to the Engine; on a CPU run every choice still decodes on CPU threads."""
    import gpfm_engine.engine as engine_module

    seen = []
    real_engine = engine_module.Engine

    def spy(*args, **kwargs):
        seen.append(kwargs.get("decoder"))
        return real_engine(*args, **kwargs)

    monkeypatch.setattr(engine_module, "Engine", spy)
    extract([slides[0], "--out", tmp_path / "out", "--decoder", "dali", "--dry-run"], tiny_weights)
    assert seen == ["dali"]
    code, text = extract([slides[0], "--out", tmp_path / "out2", "--decoder", "nonsense"], tiny_weights, expect=None)
    assert code == 2 and "nonsense" in text
