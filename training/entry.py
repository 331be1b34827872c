"""The shared shell of the ``python -m training.*`` entry points.

Logging goes to stderr, and an expected failure (any GpfmError: bad config, missing weights,
unreadable slide) ends the process with its one-line message and exit status 1 instead of a
traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from gpfm_engine.errors import GpfmError

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_entry_point(main: Callable[[], object], logger: logging.Logger) -> None:
    """Run ``main`` under the trainer's logging setup; GpfmError -> one error line, exit 1."""
    logging.basicConfig(level=logging.INFO, format=_FORMAT, stream=sys.stderr)
    try:
        main()
    except GpfmError as exc:
        logger.error("%s", exc)
        sys.exit(1)
