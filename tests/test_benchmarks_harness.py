"""The benchmark harness logic on fake functions and a fake clock: order, ratio math, outputs.

No timing assertions: the clock is injected, so every number below is exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.harness import (Comparison, Skipped, append_results, compare, compare_all, interleave, render_markdown,
                                write_json)

MACHINE = {"date": "2030-01-02T03:04:05+00:00", "cpu": "Test CPU", "cores_logical": 2, "cores_usable": 2,
           "memory_gib": 1.0, "load_avg": [0.0, 0.0, 0.0], "git_commit": "abc123",
           "versions": {"gpfm-engine": "0.1.0", "python": "3.11", "torch": "2.13.0"}}


@pytest.fixture(autouse=True)
def no_gc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness collects garbage before each timed call; on a big heap that costs seconds here."""
    monkeypatch.setattr("benchmarks.harness.gc.collect", lambda: 0)


class FakeClock:
    """Advances only when a fake function 'runs', by that function's scripted duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted(clock: FakeClock, calls: list[str], label: str, durations: list[float]):
    it = iter(durations)

    def fn() -> None:
        calls.append(label)
        clock.now += next(it)

    return fn


def test_interleaving_order_warmup_then_pairs() -> None:
    clock, calls = FakeClock(), []
    eng = scripted(clock, calls, "A", [1.0] * 8)
    base = scripted(clock, calls, "B", [1.0] * 8)
    compare("order", eng, base, repeats=5, warmup=2, clock=clock)
    assert calls == ["A", "B"] * 7


def test_ratio_median_min_max_and_goal() -> None:
    clock, calls = FakeClock(), []
    # warm-up durations first (ignored), then 5 recorded pairs
    eng = scripted(clock, calls, "A", [100.0, 1.0, 2.0, 1.0, 4.0, 2.0])
    base = scripted(clock, calls, "B", [100.0, 5.0, 6.0, 3.0, 8.0, 20.0])
    c = compare("math", eng, base, repeats=5, warmup=1, work=10, units="tiles", goal=3.0, clock=clock)
    assert c.engine == [1.0, 2.0, 1.0, 4.0, 2.0]
    assert c.baseline == [5.0, 6.0, 3.0, 8.0, 20.0]
    assert c.ratios == [5.0, 3.0, 3.0, 2.0, 10.0]
    assert (c.ratio_median, c.ratio_min, c.ratio_max) == (3.0, 2.0, 10.0)
    assert c.met is True
    assert c.rate("engine") == 10 / 2.0 and c.rate("baseline") == 10 / 6.0


def test_growth_ratio_is_engine_over_baseline_and_goal_is_a_maximum() -> None:
    c = Comparison("peak RSS 200 vs 20 slides", engine=[110.0], baseline=[100.0], metric="MiB",
                   ratio="growth", goal=1.10)
    assert c.ratios == pytest.approx([1.1])
    assert c.met is True
    assert Comparison("m", engine=[120.0], baseline=[100.0], ratio="growth", goal=1.10).met is False
    assert c.rate("engine") is None


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        Comparison("x", engine=[1.0], baseline=[])
    with pytest.raises(ValueError):
        compare("x", lambda: None, lambda: None, repeats=0)


def test_markdown_puts_ratios_first_and_shows_skips() -> None:
    c = Comparison("read+decode", engine=[1.0, 1.0, 1.0], baseline=[6.0, 5.0, 7.0], work=100, units="tiles", goal=5.0)
    md = render_markdown([c, Skipped("model", "bench_model.py not present yet")])
    header, _, row, skip = md.splitlines()
    cols = [h.strip() for h in header.strip("|").split("|")]
    assert cols[:4] == ["comparison", "ratio (median)", "min", "max"]
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[:6] == ["read+decode", "6.00x", "5.00x", "7.00x", ">= 5x", "yes"]
    assert "100.0 tiles/s" in cells[6]
    assert "skipped" in skip and "bench_model.py not present yet" in skip


def test_json_round_trip(tmp_path: Path) -> None:
    c = Comparison("e2e", engine=[2.0, 1.0], baseline=[6.0, 4.0], goal=3.0, note="n")
    out = write_json([c, Skipped("gpu", "no GPU")], tmp_path / "sub" / "r.json", machine=MACHINE, suite="cpu")
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"] == "Test CPU" and data["suite"] == "cpu"
    rec, skip = data["results"]
    assert rec["ratios"] == [3.0, 4.0] and rec["ratio_median"] == 3.5 and rec["met"] is True
    assert rec["engine"] == [2.0, 1.0] and rec["engine_median"] == 1.5
    assert skip == {"name": "gpu", "skipped": "no GPU"}


def test_append_results_adds_dated_sections(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    c = Comparison("preprocess", engine=[1.0], baseline=[9.0])
    append_results([c], "python -m benchmarks --suite cpu", path=path, machine=MACHINE)
    append_results([c], "python -m benchmarks --suite cpu", path=path, machine=MACHINE, notes="second")
    text = path.read_text()
    assert text.startswith("# gpfm-engine benchmark results")
    assert text.count("## 2030-01-02T03:04:05+00:00 — Test CPU, 2 usable cores") == 2
    assert "`python -m benchmarks --suite cpu`" in text and "| preprocess | 9.00x |" in text
    assert text.rstrip().endswith("second")


def test_compare_all_interleaves_rounds_and_pairs_each_baseline_with_its_round() -> None:
    clock, calls = FakeClock(), []
    eng = scripted(clock, calls, "E", [9.0, 1.0, 2.0])
    a = scripted(clock, calls, "a", [9.0, 3.0, 4.0])
    b = scripted(clock, calls, "b", [9.0, 10.0, 6.0])
    ca, cb = compare_all("e2e", eng, {"CLAM-style": a, "TRIDENT-style": b}, repeats=2, warmup=1, clock=clock)
    assert calls == ["E", "a", "b"] * 3
    assert (ca.name, cb.name) == ("e2e vs CLAM-style", "e2e vs TRIDENT-style")
    assert ca.engine == cb.engine == [1.0, 2.0]
    assert ca.ratios == [3.0, 2.0] and cb.ratios == [10.0, 3.0]
    assert cb.baseline_label == "TRIDENT-style"


def test_plot_writes_a_png_with_one_row_per_comparison(tmp_path: Path) -> None:
    from PIL import Image

    from benchmarks.plot import plot_ratios

    rows = [Comparison("read+decode", engine=[1.0, 1.0], baseline=[6.0, 8.0], goal=5.0),
            Comparison("peak RSS", engine=[103.0], baseline=[100.0], metric="MiB", ratio="growth", goal=1.1),
            Skipped("model", "absent")]
    out = plot_ratios(rows, tmp_path / "r.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 2 * 46


def test_interleave_returns_raw_seconds_per_label_and_round() -> None:
    clock, calls = FakeClock(), []
    fns = {"x": scripted(clock, calls, "x", [5.0, 1.0, 2.0, 3.0]), "y": scripted(clock, calls, "y", [5.0, 4.0, 5.0, 6.0])}
    times = interleave(fns, repeats=3, warmup=1, clock=clock)
    assert calls == ["x", "y"] * 4
    assert times == {"x": [1.0, 2.0, 3.0], "y": [4.0, 5.0, 6.0]}
    with pytest.raises(ValueError):
        compare_all("dup", fns["x"], {"engine": fns["y"]})
