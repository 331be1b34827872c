"""How an extraction run talks to the person (or the program) watching it.

The pipeline calls a ``Reporter`` at a handful of moments (run start, slide start, batch done,
slide finished, run end) from one thread. Three implementations: ``RichReporter`` (progress bars
with slides done/total, patches/s, ETA and the current slide, then a summary table),
``JsonReporter`` (one JSON object per line, for ``--log-json``) and ``Reporter`` itself, which says
nothing (``--quiet``; failures are still printed by the CLI).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Sequence

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from gpfm_engine.runlog import SlideRecord, Status


class Reporter:
    """The silent reporter; subclasses override what they show."""

    def run_started(self, total_slides: int, info: dict[str, Any]) -> None:
        pass

    def slide_started(self, name: str, patches: int) -> None:
        pass

    def batch_done(self, name: str, patches: int) -> None:
        pass

    def slide_finished(self, record: SlideRecord) -> None:
        pass

    def run_finished(self, records: Sequence[SlideRecord], seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


class _RateColumn(TextColumn):
    """Patches per second over the whole run (rich's speed column is per task and jumpy)."""

    def __init__(self) -> None:
        super().__init__("")
        self.t0 = time.monotonic()
        self.count = 0

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        rate = self.count / max(time.monotonic() - self.t0, 1e-9)
        return Text(f"{rate:,.1f} patches/s", style="progress.data.speed")


class RichReporter(Reporter):
    """Live progress bars on the terminal, then a summary table."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.rate = _RateColumn()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), self.rate,
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[current]}"),
            console=self.console, transient=False, refresh_per_second=4,
        )
        self.slides: TaskID | None = None
        self.patches: TaskID | None = None
        self._handlers: list[logging.Handler] = []
        self._muted: list[logging.Handler] = []

    def run_started(self, total_slides: int, info: dict[str, Any]) -> None:
        self._route_logging()
        self.progress.start()
        self.slides = self.progress.add_task("slides", total=total_slides, current="")
        self.patches = self.progress.add_task("patches", total=None, current="")

    def slide_started(self, name: str, patches: int) -> None:
        self.progress.update(self.slides, current=name)
        self.progress.update(self.patches, total=patches, completed=0, current=name)

    def batch_done(self, name: str, patches: int) -> None:
        self.rate.count += patches
        self.progress.advance(self.patches, patches)

    def slide_finished(self, record: SlideRecord) -> None:
        self.progress.advance(self.slides, 1)
        if record.failed:
            self.progress.console.print(f"[red]{record.status.value}[/red] {record.error}", highlight=False)

    def run_finished(self, records: Sequence[SlideRecord], seconds: float) -> None:
        self.close()
        self.console.print(summary_table(records, seconds))

    def close(self) -> None:
        self.progress.stop()
        root = logging.getLogger()
        for handler in self._handlers:
            root.removeHandler(handler)
        for handler in self._muted:
            root.addHandler(handler)
        self._handlers, self._muted = [], []

    def _route_logging(self) -> None:
        """Show log records above the live bars (a plain stderr handler would tear them apart)."""
        from rich.logging import RichHandler

        root = logging.getLogger()
        self._muted = [h for h in root.handlers if type(h) is logging.StreamHandler]
        for handler in self._muted:
            root.removeHandler(handler)
        level = min((h.level for h in self._muted), default=logging.WARNING)
        handler = RichHandler(console=self.console, level=level, show_time=False, show_path=False)
        root.addHandler(handler)
        self._handlers = [handler]


class JsonReporter(Reporter):
    """One JSON object per event on ``stream`` (stdout by default), for log collectors."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def _emit(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")
        self.stream.flush()

    def run_started(self, total_slides: int, info: dict[str, Any]) -> None:
        self._emit("run_started", slides=total_slides, **info)

    def slide_started(self, name: str, patches: int) -> None:
        self._emit("slide_started", slide=name, patches=patches)

    def slide_finished(self, record: SlideRecord) -> None:
        self._emit("slide_finished", **record.to_json())

    def run_finished(self, records: Sequence[SlideRecord], seconds: float) -> None:
        self._emit("run_finished", seconds=round(seconds, 3), **counts(records))


def counts(records: Sequence[SlideRecord]) -> dict[str, int]:
    """Slides per status plus the patch total."""
    out = {s.value: 0 for s in Status}
    for r in records:
        out[r.status.value] += 1
    out["patches"] = sum(r.patches for r in records)
    return out


_STYLE = {Status.DONE: "green", Status.SKIPPED: "cyan", Status.PLANNED: "cyan", Status.BUSY: "yellow",
          Status.FAILED: "red", Status.REFUSED: "red"}


def summary_table(records: Sequence[SlideRecord], seconds: float) -> Table:
    """The end-of-run table: one row per slide, then the totals in the caption."""
    c = counts(records)
    computed = sum(r.patches for r in records if r.status is Status.DONE)
    caption = (f"{len(records)} slides: " + ", ".join(f"{c[s.value]} {s.value}" for s in Status if c[s.value])
               + f" | {c['patches']:,} patches | {seconds:.1f} s"
               + (f" | {computed / seconds:,.1f} patches/s" if computed and seconds > 0 else ""))
    table = Table(title="gpfm-engine extract", caption=caption)
    table.add_column("slide", no_wrap=True, overflow="ellipsis", max_width=32)
    for col in ("status", "patches", "seconds"):
        table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True, min_width=len(col))
    table.add_column("note", overflow="fold")  # corrupt tiles skipped, empty grids, the error line
    for r in records:
        table.add_row(r.name, f"[{_STYLE[r.status]}]{r.status.value}[/]", f"{r.patches:,}", f"{r.seconds:.1f}",
                      r.error or r.detail)
    return table
