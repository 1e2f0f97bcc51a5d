"""Watching a directory for the checkpoints a training job commits.

:func:`checkpoints_iterator` yields new committed checkpoints as they appear
(the newest at each look, or every one in order), :func:`wait_for_new_checkpoint`
waits for the next, and :func:`training_finished` tells whether the trainer
wrote its final checkpoint (:func:`stop_when_training_ends` is that test as a
``timeout_fn``). Only committed checkpoints are ever seen. Re-exported by
:mod:`torchslim.evaluation`, which runs an evaluation on each.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Generator

from torchslim import checkpoint
from torchslim._checks import check_bool, check_callable, check_positive, check_seconds

log = logging.getLogger("torchslim")

DELETED = "Checkpoint %s was deleted before it could be evaluated (the trainer's max_to_keep?); skipping it"


def _is_newer(path: str, last: str | None) -> bool:
    """A higher global step than ``last`` (never going back, even while the newest is briefly out of view)."""
    if last is None:
        return True
    try:
        return checkpoint.step_of(path) > checkpoint.step_of(last)
    except ValueError:  # `last` is not a checkpoint name: compare paths, as the original did
        return path != last


def _poll(find: Callable[[], str | None], seconds_to_sleep: float, timeout: float | None) -> str | None:
    """Call ``find`` until it returns a path; None once another sleep would pass ``timeout`` (the original's rule)."""
    stop_time = None if timeout is None else time.monotonic() + timeout
    while True:
        path = find()
        if path is not None:
            log.info("Found new checkpoint at %s", path)
            return path
        if stop_time is not None and time.monotonic() + seconds_to_sleep > stop_time:
            return None
        time.sleep(seconds_to_sleep)


def wait_for_new_checkpoint(checkpoint_dir: str | os.PathLike, last_checkpoint: str | None = None,
                            seconds_to_sleep: float = 1, timeout: float | None = None) -> str | None:
    """Wait until a committed checkpoint newer than ``last_checkpoint`` is in ``checkpoint_dir``.

    Args:
        checkpoint_dir: the directory to watch; it need not exist yet.
        last_checkpoint: the last path seen; newer means a higher global step.
        seconds_to_sleep: how long to sleep between looks.
        timeout: give up (return None) when the next sleep would end after this many
            seconds, as the original did; None: wait forever.

    Returns:
        The newest checkpoint's path, or None on timeout.
    """
    check_positive(seconds_to_sleep, "seconds_to_sleep")
    check_seconds(timeout, "timeout", optional=True)
    log.info("Waiting for a new checkpoint in %s", os.fspath(checkpoint_dir))
    return _poll(_newest_after(checkpoint_dir, last_checkpoint), seconds_to_sleep, timeout)


def _newest_after(checkpoint_dir: str | os.PathLike, last: str | None) -> Callable[[], str | None]:
    def find() -> str | None:
        path = checkpoint.latest_checkpoint(checkpoint_dir)
        return path if path is not None and _is_newer(path, last) else None

    return find


class _InOrder:
    """Finds the oldest committed checkpoint after the last one; warns about those deleted before their turn."""

    def __init__(self, checkpoint_dir: str | os.PathLike) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.last: str | None = None
        self.waiting: list[str] = []

    def __call__(self) -> str | None:
        newer = [p for p in checkpoint.list_checkpoints(self.checkpoint_dir) if _is_newer(p, self.last)]
        for gone in (p for p in self.waiting if p not in newer and _is_newer(p, self.last)):
            log.warning(DELETED, gone)
        self.waiting = newer
        return newer[0] if newer else None


def checkpoints_iterator(checkpoint_dir: str | os.PathLike, min_interval_secs: float = 0,
                         timeout: float | None = None, timeout_fn: Callable[[], bool] | None = None,
                         every_checkpoint: bool = False) -> Generator[str, None, None]:
    """Yield new committed checkpoints in ``checkpoint_dir`` as they appear.

    By default, as the original, each wait yields the newest checkpoint, so a slow
    consumer skips those committed meanwhile. ``every_checkpoint=True`` yields every
    committed checkpoint in order of global step, none twice; a backlog is yielded
    without waiting ``min_interval_secs``, and one deleted before its turn is
    skipped with a warning. Neither ever yields an older step than the last.

    Args:
        checkpoint_dir: the directory to watch; it need not exist (then nothing is
            yielded once ``timeout`` passes, and no error is raised).
        min_interval_secs: at least this long between the starts of two yields.
        timeout: the most seconds to wait for a new checkpoint; None: forever. The
            directory is looked at every ``min(1, timeout / 10)`` s (at least 10 ms),
            so that a short timeout is honoured rather than rounded down to whole seconds.
        timeout_fn: called once per timeout: False keeps waiting; True ends the
            iteration (after yielding what arrived since the last look). None: a
            timeout ends it.
        every_checkpoint: yield all checkpoints in order (see above).
    """
    check_seconds(min_interval_secs, "min_interval_secs")
    check_seconds(timeout, "timeout", optional=True)
    if timeout_fn is not None:
        check_callable(timeout_fn, "timeout_fn")
    check_bool(every_checkpoint, "every_checkpoint")
    return _iterate(checkpoint_dir, min_interval_secs, timeout, timeout_fn, every_checkpoint)


def _iterate(checkpoint_dir: str | os.PathLike, min_interval_secs: float, timeout: float | None,
             timeout_fn: Callable[[], bool] | None, every_checkpoint: bool) -> Generator[str, None, None]:
    sleep = 1.0 if timeout is None else max(0.01, min(1.0, timeout / 10))
    in_order = _InOrder(checkpoint_dir)
    ending = False  # timeout_fn said done: yield only what is already there, then stop
    while True:
        find = in_order if every_checkpoint else _newest_after(checkpoint_dir, in_order.last)
        path = find() if ending else _poll(find, sleep, timeout)
        if path is None:
            if ending:
                return
            if timeout_fn is None:
                log.info("Timed out waiting for a checkpoint in %s", os.fspath(checkpoint_dir))
                return
            if not timeout_fn():
                continue
            ending, path = True, find()  # one that arrived since the last look is still yielded
            if path is None:
                return
        started = time.monotonic()
        in_order.last = path
        yield path
        backlog = every_checkpoint and in_order() is not None
        if not (ending or backlog):
            time.sleep(max(0.0, started + min_interval_secs - time.monotonic()))


def training_finished(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether the latest checkpoint in ``checkpoint_dir`` is the final one of a run that ended normally."""
    path = checkpoint.latest_checkpoint(checkpoint_dir)
    try:
        return path is not None and bool(checkpoint.read_metadata(path).get("final", False))
    except (ValueError, OSError):  # deleted or replaced while being read: not known to be final
        return False


def stop_when_training_ends(checkpoint_dir: str | os.PathLike) -> Callable[[], bool]:
    """A ``timeout_fn`` that ends the wait once training has written its final checkpoint.

    With it, :func:`evaluation_loop` evaluates that checkpoint and returns. A
    trainer that was killed or stopped by a signal writes no final checkpoint,
    so the wait goes on; combine it with a deadline if that can happen.
    """
    return lambda: training_finished(checkpoint_dir)
