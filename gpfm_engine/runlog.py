"""``DIR/run.json``: what happened to every slide of the runs into one output folder.

One row per output name: source path, status, patches, seconds, tiles skipped, the error line (for
failures), host/pid and finish time; plus totals over the rows and a short record of the latest
run (with its own counts). A row says the slide's latest real outcome: a later run that skipped it
(already done) or found it busy (another process on it) does not replace the row of the run that
computed it. Several processes may share a folder, so every update re-reads the file and merges this
process's rows under a short lock, then replaces the file atomically.
"""
from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpfm_engine import locks
from gpfm_engine.store import atomic_write_json


class Status(str, enum.Enum):
    DONE = "done"          # computed in this run
    SKIPPED = "skipped"    # already done with the same recipe
    FAILED = "failed"      # error (unreadable slide, unknown mpp, corrupt tile with on_tile_error=fail...)
    REFUSED = "refused"    # an output with a different recipe exists and --overwrite was not given
    BUSY = "busy"          # another live process holds the slide's lock
    PLANNED = "planned"    # --dry-run: grid computed, nothing extracted


FAILURE_STATUSES = frozenset({Status.FAILED, Status.REFUSED})
# Outcomes that say nothing new about a slide another run computed: they never replace its row.
_INFORMATIONAL = frozenset({Status.SKIPPED, Status.BUSY})


@dataclass
class SlideRecord:
    """One slide's outcome (a row of run.json, and of the summary table)."""

    name: str
    path: str
    status: Status
    patches: int = 0
    seconds: float = 0.0
    tiles_skipped: int = 0
    error: str | None = None
    detail: str = ""
    host: str = field(default_factory=lambda: locks.HOST)
    pid: int = field(default_factory=os.getpid)
    finished: float = field(default_factory=time.time)

    @property
    def failed(self) -> bool:
        return self.status in FAILURE_STATUSES

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["status"] = self.status.value
        row["seconds"] = round(self.seconds, 3)
        return row


def totals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts per status, patch total and seconds over run.json rows."""
    out: dict[str, Any] = {s.value: 0 for s in Status}
    out.update(slides=len(rows), patches=0, seconds=0.0)
    for row in rows.values():
        out[row["status"]] = out.get(row["status"], 0) + 1
        out["patches"] += int(row.get("patches") or 0)
        out["seconds"] = round(out["seconds"] + float(row.get("seconds") or 0.0), 3)
    return out


class RunLog:
    """Merges this process's slide records into ``DIR/run.json``.

    The file is rewritten at most every ``FLUSH_EVERY_S`` seconds (and at the end of the run):
    rewriting it after every slide would cost O(slides²) bytes over a 10,000-slide cohort. A killed
    run's run.json may therefore miss its last few seconds; the h5 files remain the truth.
    """

    LOCK_WAIT_S = 10.0
    FLUSH_EVERY_S = 2.0

    def __init__(self, root: Path, run_info: dict[str, Any]) -> None:
        self.path = root / "run.json"
        self.run_info = dict(run_info, started=time.time(), host=locks.HOST, pid=os.getpid())
        self.records: list[SlideRecord] = []
        self._flushed = 0.0

    def add(self, record: SlideRecord) -> None:
        self.records.append(record)
        if time.monotonic() - self._flushed >= self.FLUSH_EVERY_S:
            self.flush()

    def flush(self, finished: bool = False) -> None:
        """Re-read run.json, merge our rows, write it back atomically (under a short lock)."""
        self._flushed = time.monotonic()
        lock = self._lock()
        try:
            data = self._read()
            rows = data.get("slides", {})
            for r in self.records:
                if r.status in _INFORMATIONAL and rows.get(r.name, {}).get("status") == Status.DONE.value:
                    continue  # keep the record of the run that computed the slide
                rows[r.name] = r.to_json()
            this_run = {s.value: 0 for s in Status}
            for r in self.records:
                this_run[r.status.value] += 1
            info = dict(self.run_info, slides=len(self.records), counts=this_run)
            if finished:
                info["finished"] = time.time()
            data.update(slides=rows, totals=totals(rows), last_run=info)
            atomic_write_json(self.path, data)
        finally:
            if lock is not None:
                lock.release()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _lock(self) -> locks.SlideLock | None:
        """A short exclusive lock on run.json; after LOCK_WAIT_S we write anyway (last wins)."""
        deadline = time.monotonic() + self.LOCK_WAIT_S
        lock_path = self.path.with_name("run.json.lock")
        while True:
            lock = locks.try_lock(lock_path, stale_after_s=self.LOCK_WAIT_S * 3)
            if lock is not None or time.monotonic() > deadline:
                return lock
            time.sleep(0.05)
