"""Evaluation records: each checkpoint's metrics as an evaluator measured them, where a trainer can read them.

When the evaluation runs in another process (``evaluation_loop(..., record=True)``,
``torchslim eval --watch --record``), the evaluator keeps one file in the
checkpoint directory, ``evaluations.json``::

    {"format": "torchslim.evaluations/1",
     "checkpoints": {"300": {"accuracy": 0.91, "total_loss": 0.32}, ...}}

It has one writer: a :class:`RecordWriter` holds an exclusive lock on
``.evaluations.lock`` for as long as it records (the operating system drops
the lock when its process dies, so a killed evaluator can be restarted at
once), and a second one is refused. Each record rewrites the whole file into
a temporary file beside it, fsyncs it, and renames it into place, so a reader
(the trainer's retention and early stopping) sees the previous version or the
next, never a torn one. A checkpoint's metrics never change once recorded.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; one writer is then the user's promise
    fcntl = None  # type: ignore[assignment]

RECORDS_FILE = "evaluations.json"
LOCK_FILE = ".evaluations.lock"
FORMAT = "torchslim.evaluations/1"
MODES = ("max", "min")


def check_mode(mode: object, name: str = "mode") -> str:
    """``mode`` if it is ``"max"`` or ``"min"``; else a ValueError naming ``name``."""
    if mode not in MODES:
        raise ValueError(f"`{name}` must be 'max' (higher is better, e.g. accuracy) or 'min' (lower is better, "
                         f"e.g. a loss), got {mode!r}")
    return str(mode)


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (NaN never improves; anything beats None)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def rank_key(value: float, step: int, mode: str) -> tuple[bool, float, int]:
    """A sort key, best first: NaN last, then by value in ``mode``'s direction, then the earlier step."""
    return math.isnan(value), (-value if mode == "max" else value) if not math.isnan(value) else 0.0, step


def read_records(directory: str | os.PathLike) -> dict[int, dict[str, float]]:
    """The metrics an evaluator recorded in ``directory``, by global step; ``{}`` if it recorded none.

    A file that cannot be parsed is treated as absent: it is only ever replaced
    whole, so this happens only if someone else wrote it.
    """
    try:
        with open(os.path.join(os.fspath(directory), RECORDS_FILE), "rb") as f:
            data = json.loads(f.read())
    except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("checkpoints"), dict):
        return {}
    return {int(step): dict(metrics) for step, metrics in data["checkpoints"].items()}


class RecordWriter:
    """The one writer of a directory's evaluation records (see the module docstring).

    Raises:
        ValueError: another live process is already recording into ``directory``.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self._lock = open(os.path.join(self.directory, LOCK_FILE), "a+b")  # noqa: SIM115 - held until close()
        if fcntl is not None:
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise ValueError(f"another evaluator is already recording metrics into {self.directory} (it holds "
                                 f"{LOCK_FILE}); records have one writer: stop it, or pass record=False") from None
        self.records = read_records(self.directory)

    def recorded(self, step: int) -> bool:
        return step in self.records

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        """Add ``metrics`` for the checkpoint at ``step`` and commit the file (temp file, fsync, rename)."""
        self.records[int(step)] = {str(k): float(v) for k, v in metrics.items()}
        data: dict[str, Any] = {"format": FORMAT,
                                "checkpoints": {str(s): m for s, m in sorted(self.records.items())}}
        fd, tmp = tempfile.mkstemp(prefix=f".{RECORDS_FILE}.tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(data).encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.directory, RECORDS_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def close(self) -> None:
        self._lock.close()  # releases the lock

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
