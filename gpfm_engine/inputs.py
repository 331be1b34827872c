"""The SLIDES arguments of ``gpfm-engine extract``: files, folders, globs, or CSV lists.

- a file with a slide suffix is a slide (a missing file stays in the list and fails with a clear
  error row later, so a typo never silently shrinks a cohort);
- a folder contributes its slide files (``recursive=True`` descends into sub-folders); a DICOM
  series is a folder of ``.dcm`` files that OpenSlide opens from any one of them, so a folder
  contributes its first ``.dcm`` only;
- a pattern with ``*``, ``?`` or ``[`` is expanded (``**`` descends);
- a ``.csv`` file lists slides in a ``path`` column (also accepted: ``slide_path``, ``wsi``,
  ``slide``, ``filename``) with an optional ``mpp`` column overriding the slide's own µm/px;
  relative paths are relative to the CSV's folder (as TRIDENT's ``--custom_list_of_wsis``).

Duplicates (same resolved path) are dropped, keeping the first; order is the order given, folder
and glob expansions sorted.
"""
from __future__ import annotations

import csv
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from gpfm_engine.errors import GpfmError

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = frozenset({
    ".svs", ".tif", ".tiff", ".btf", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm", ".dicom", ".qptiff",
})
PATH_COLUMNS = ("path", "slide_path", "wsi", "slide", "filename")
MPP_COLUMNS = ("mpp", "mpp_x")


class InputError(GpfmError):
    """A SLIDES argument cannot be understood (unreadable CSV, CSV without a path column...)."""

    def __init__(self, source: str | Path, cause: str) -> None:
        super().__init__(f"{source}: {cause}")


@dataclass(frozen=True)
class SlideInput:
    """One slide to process, with the per-slide µm/px override a CSV may give."""

    path: Path
    mpp: float | None = None


def is_slide_file(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _scan_folder(folder: Path, recursive: bool) -> list[Path]:
    """Slide files of a folder (sorted), one file per DICOM series folder."""
    out: list[Path] = []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, dirs, files in walker:
        dirs.sort()
        root_path = Path(root)
        dicom_taken = False
        for name in sorted(files):
            p = root_path / name
            if not p.is_file() or not is_slide_file(p):
                continue
            if p.suffix.lower() in (".dcm", ".dicom"):
                if dicom_taken:
                    continue
                dicom_taken = True
            out.append(p)
    return out


def read_csv(csv_path: Path) -> list[SlideInput]:
    """Slides listed in a CSV (see the module docstring for the accepted columns)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(csv_path, f"cannot read the slide list ({exc})") from exc
    if not rows:
        return []
    columns = {c.strip().lower(): c for c in rows[0].keys() if c}
    path_col = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if path_col is None:
        raise InputError(csv_path, f"no path column (expected one of {', '.join(PATH_COLUMNS)})")
    mpp_col = next((columns[c] for c in MPP_COLUMNS if c in columns), None)
    out: list[SlideInput] = []
    for i, row in enumerate(rows, start=2):
        raw = (row.get(path_col) or "").strip()
        if not raw:
            continue
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = csv_path.parent / path
        mpp = None
        text = (row.get(mpp_col) or "").strip() if mpp_col else ""
        if text:
            try:
                mpp = float(text)
            except ValueError as exc:
                raise InputError(csv_path, f"line {i}: mpp {text!r} is not a number") from exc
            if not mpp > 0:
                raise InputError(csv_path, f"line {i}: mpp must be positive, got {text}")
        out.append(SlideInput(path, mpp))
    return out


def collect_slides(specs: Iterable[str | Path], recursive: bool = False) -> list[SlideInput]:
    """Expand SLIDES arguments into slide inputs (see the module docstring)."""
    found: list[SlideInput] = []
    for spec in specs:
        text = str(spec)
        path = Path(text).expanduser()
        if path.is_dir():
            found.extend(SlideInput(p) for p in _scan_folder(path, recursive))
        elif path.suffix.lower() == ".csv" and path.is_file():
            found.extend(read_csv(path))
        elif _is_glob(text) and not path.exists():
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
            slides = [SlideInput(m) for m in matches if m.is_file() and is_slide_file(m)]
            if not slides:
                log.warning("%s: the pattern matches no slide file", text)
            found.extend(slides)
        else:
            found.append(SlideInput(path))
    return _dedupe(found)


def _dedupe(items: list[SlideInput]) -> list[SlideInput]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = os.path.realpath(item.path)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out
