"""One exception type per failure class; each message names the file and the cause on one line."""
from __future__ import annotations

from pathlib import Path


class GpfmError(Exception):
    """Base class of every error the engine raises on purpose."""


class SlideError(GpfmError):
    """A slide cannot be opened or read (missing, truncated, unsupported, no trustworthy mpp...)."""

    def __init__(self, path: str | Path, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class TileDecodeError(SlideError):
    """One stored tile of a slide cannot be decoded; callers choose to skip it or fail the slide."""

    def __init__(self, path: str | Path, level: int, index: int, cause: str) -> None:
        self.level = level
        self.index = index
        super().__init__(path, f"level {level} tile {index}: {cause}")


class WeightsError(GpfmError):
    """Model weights are missing, unsafe, or do not match the architecture."""


class MissingExtraError(GpfmError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the '{package}' package: pip install 'gpfm-engine[{extra}]'")


def exception_summary(exc: BaseException) -> str:
    """``Type: first line of the message``: third-party errors folded into our one-line messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
