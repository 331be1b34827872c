"""Per-slide lock files, so that two processes (or two machines) sharing an output folder never
work on the same slide.

A lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on
NFSv3+), holding the owner's host, pid and start time. The owner refreshes its mtime while it
works (``refresh``), so a lock is *stale* when either its owner is a dead process on this host, or
its mtime is older than ``stale_after_s`` (an owner on another host that stopped heart-beating).

Taking over a stale lock is the delicate part: two processes may both find the same lock stale.
Only the process that wins an ``O_EXCL`` "breaker" file may remove it, and it re-checks the
staleness while holding the breaker; after removal everybody competes through ``O_EXCL`` again,
so exactly one process ends up owning the slide.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HOST = socket.gethostname()
# An owner refreshes its locks this often while it holds them (see ``SlideLock.refresh``).
REFRESH_EVERY_S = 30.0
# A lock untouched for this long belongs to a process that stopped (crashed host, lost mount).
STALE_AFTER_S = 600.0


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock, as recorded inside the lock file."""

    host: str
    pid: int
    started: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (permission errors mean it does)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(path: Path) -> LockOwner | None:
    """The owner recorded in a lock file; None when it is absent or unreadable (half-written)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(str(data["host"]), int(data["pid"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_stale(path: Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """A lock is stale when its owner is a dead pid on this host or it was not refreshed in time.

    An unreadable lock (its owner died between create and write) is judged by its mtime alone.
    """
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > stale_after_s:
        return True
    owner = read_owner(path)
    if owner is not None and owner.host == HOST and owner.pid != os.getpid():
        return not _pid_alive(owner.pid)
    return False


def _create_exclusive(path: Path, payload: bytes) -> bool:
    """Create ``path`` holding ``payload`` if it does not exist; False when someone else has it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _break_stale(path: Path, stale_after_s: float) -> None:
    """Remove ``path`` if it is stale, serialised through an O_EXCL breaker file."""
    breaker = path.with_name(path.name + ".break")
    if not _create_exclusive(breaker, _payload()):
        # Another process is breaking this lock right now; a breaker left by a crash is itself
        # removed once it is old.
        if is_stale(breaker, stale_after_s):
            _unlink_quiet(breaker)
        return
    try:
        if is_stale(path, stale_after_s):
            owner = read_owner(path)
            log.warning("taking over stale lock %s (%s)", path, owner.describe() if owner else "unreadable")
            _unlink_quiet(path)
    finally:
        _unlink_quiet(breaker)


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _payload() -> bytes:
    return json.dumps({"host": HOST, "pid": os.getpid(), "started": time.time()}).encode()


class SlideLock:
    """An acquired lock; release it (or use it as a context manager) when the slide is done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.released = False

    def refresh(self) -> None:
        """Touch the lock so other hosts keep seeing a live owner (the pipeline's heartbeat calls
        this every ``REFRESH_EVERY_S``); a lock another process took over is left alone."""
        if self.released or not self._ours():
            return
        try:
            os.utime(self.path)
        except OSError as exc:  # lost mount: the slide's outputs are still published atomically
            log.warning("cannot refresh lock %s: %s", self.path, exc)

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover after a long stall leaves it alone)."""
        if not self.released and self._ours():
            _unlink_quiet(self.path)
        self.released = True

    def _ours(self) -> bool:
        owner = read_owner(self.path)
        return owner is not None and owner.host == HOST and owner.pid == os.getpid()

    def __enter__(self) -> "SlideLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path, stale_after_s: float = STALE_AFTER_S) -> SlideLock | None:
    """Acquire the lock at ``path``, taking over a stale one; None when a live owner holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        if _create_exclusive(path, _payload()):
            return SlideLock(path)
        _break_stale(path, stale_after_s)
    return None


def clear_stale(path: Path, stale_after_s: float = STALE_AFTER_S) -> None:
    """Remove the lock at ``path`` if its owner is gone (e.g. killed after finishing its slide)."""
    if path.exists() and is_stale(path, stale_after_s):
        _break_stale(path, stale_after_s)


def holder(path: Path) -> LockOwner | None:
    """Who holds the lock at ``path`` now (for messages)."""
    return read_owner(path)
