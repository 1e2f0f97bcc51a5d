"""torchslim's log lines when the application has not configured logging.

A script that never calls ``logging.basicConfig`` would see nothing of a run
(Python shows only warnings then, without a time): no "Restored ...", no loss
lines, no saves. As absl does for TensorFlow, :func:`default_logging` shows
torchslim's INFO lines on stderr for the duration of a run, and only then: an
application that configured logging (a handler on the root logger or on
``torchslim``, or a level set on ``torchslim``) is left exactly as it is.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger("torchslim")


@contextlib.contextmanager
def default_logging() -> Iterator[None]:
    """Inside the block, torchslim's INFO lines go to stderr, unless the application configured logging."""
    configured = logging.root.handlers or log.handlers or log.level != logging.NOTSET
    if configured:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s torchslim %(levelname)s: %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
