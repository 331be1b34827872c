"""benchmarks/gpu_check.py works before anyone spends GPU time on it.

The device check runs where device time is short and every minute counts, so the script itself
must be known good: ``--help`` answers, and ``--dry-run`` (CPU, tiny model and slides) goes
through every section, writes its report and exits with a verdict. Nothing here is timed.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_help(capsys) -> None:
    from benchmarks import gpu_check

    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--dry-run", "--data", "--results", "--budget-s", "--only"):
        assert option in out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    results = tmp_path_factory.mktemp("gpu-check") / "RESULTS.md"
    done = run_script("--dry-run", "--results", str(results))
    assert results.exists(), done.stderr
    return done, results.read_text()


def test_dry_run_reports_every_section(dry_run) -> None:
    done, report = dry_run
    assert done.returncode in (0, 1), done.stderr  # 1 = a check failed: a verdict, not a crash
    assert "GPU check on CPU only" in report and "DRY RUN" in report
    assert "| throughput | img/s | of 4,880 img/s | detail |" in report
    assert "| build | extension imports | ok |" in report
    assert re.search(r"\| decode \| cpu decoder \| ok \| [\d,]+ tiles/s", report)
    assert "model-only: torch eager, batch 8" in report
    assert "| model-only: torch.compile + CUDA graphs | – | – | skipped: needs CUDA |" in report
    assert re.search(r"\| end-to-end: gpfm-engine extract, .*, torch eager \| [\d,]+ \|", report)
    # the compiled engine runs on the CPU too (no CUDA graphs there) and agrees with the eager one
    if shutil.which("g++") or shutil.which("c++"):
        assert re.search(r"\| end-to-end: gpfm-engine extract, .*, torch.compile \(CPU: no CUDA graphs\) \| [\d,]+ \|"
                         r".*buckets \[8\]", report)
        assert re.search(r"\| end-to-end \| .*torch.compile .* features vs eager \| ok \| same coords: True", report)
    assert re.search(r"gpu_check: \d+ checks, \d+ failed, \d+ section errors", done.stderr)


def test_dry_run_sections_fail_only_on_parts_not_built_yet(dry_run) -> None:
    """A section may error only because a gpfm_engine module it needs does not exist yet (or
    because an earlier section it depends on did); anything else is a bug in the script."""
    _, report = dry_run
    errors = dict(re.findall(r"^\| ([\w-]+) \| section \| \*\*ERROR\*\* \| (.*) \|$", report, re.M))
    for section, error in errors.items():
        missing = re.search(r"No module named '(gpfm_engine[\w.]*)'", error)
        if missing:
            assert importlib.util.find_spec(missing.group(1)) is None, f"{section}: {error}"
        elif section == "baseline":
            assert "end-to-end" in errors, f"{section}: {error}"
        else:
            pytest.fail(f"section {section} failed: {error}")
    failed = re.findall(r"^\| ([\w-]+) \| (.*) \| \*\*FAIL\*\* \| (.*) \|$", report, re.M)
    assert not failed, failed
