"""Where summaries go: writers with one small interface, a null one and a fan-out.

``SummaryWriter`` is the protocol (``add_scalar``, ``add_histogram``,
``add_images``, ``flush``, ``close``); ``NullWriter`` writes nothing,
``TensorBoardWriter`` writes event files off the training thread,
``JsonlWriter`` appends ``metrics.jsonl``, and ``MultiWriter`` sends to several.
:func:`default_writer` is what a run writes to when given no writer: TensorBoard
event files and ``metrics.jsonl`` in its logdir. Re-exported by
:mod:`torchslim.summaries`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Protocol

import torch


class SummaryWriter(Protocol):
    """Where summaries go. ``NullWriter``, ``TensorBoardWriter``, ``JsonlWriter`` and ``MultiWriter`` are provided."""

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None: ...

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """``images``: [N, C, H, W], float in [0, 1] or uint8."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NullWriter:
    """Writes nothing (``summary_writer=None``)."""

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        pass

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(NullWriter):
    """TensorBoard event files in ``logdir``, through ``torch.utils.tensorboard``, written off the training thread.

    The calling thread only snapshots the values (a copy, since the next step
    changes the weights); one background thread computes histograms (with torch,
    ``buckets`` equal-width buckets, far cheaper than NumPy's exponential
    buckets on large tensors), encodes images and writes, in call order. Errors
    of the background thread are raised by the next call. The event file and
    the thread are made by the first write: a run that writes nothing leaves
    no empty event file behind.
    """

    def __init__(self, logdir: str | os.PathLike, flush_secs: int = 30, buckets: int = 30) -> None:
        self.logdir = os.fspath(logdir)
        self.buckets, self.flush_secs = buckets, flush_secs
        self._writer: Any = None
        self._pool: Any = None
        self._pending: list[Any] = []

    def _submit(self, name: str, *args: Any) -> None:
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            from torch.utils.tensorboard import SummaryWriter as _TorchWriter

            self._writer = _TorchWriter(self.logdir, flush_secs=self.flush_secs)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="torchslim-summaries")
        done = [f for f in self._pending if f.done()]
        for f in done:
            self._pending.remove(f)
            f.result()  # re-raises an error of the background thread here
        fn = self._histogram if name == "histogram" else getattr(self._writer, name)
        self._pending.append(self._pool.submit(fn, *args))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._submit("add_scalar", tag, value, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._submit("histogram", tag, values.detach().to("cpu", torch.float32, copy=True).flatten(), step)

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        self._submit("add_images", tag, images.detach().to("cpu", copy=True), step, None, "NCHW")

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        total, squares = float(values.sum()), float(values.dot(values))
        if not (math.isfinite(total) and math.isfinite(squares)):  # NaN/Inf (or overflow): drop the non-finite
            values = values[torch.isfinite(values)]
            total, squares = float(values.sum()), float(values.dot(values))
        if values.numel() == 0:
            return
        low, high = (float(v) for v in values.aminmax())
        if low == high:
            limits, counts = [high], [float(values.numel())]
        else:
            counts = torch.histc(values, bins=self.buckets, min=low, max=high).tolist()
            limits = torch.linspace(low, high, self.buckets + 1)[1:].tolist()
        self._writer.add_histogram_raw(tag, low, high, values.numel(), total, squares, limits, counts, step)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is None:
            return
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)
            self._writer.close()


class JsonlWriter(NullWriter):
    """Scalars as JSON lines (``{"step", "tag", "value", "wall_time"}``) appended to ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file: Any = None  # opened by the first write: nothing written, no file

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
        record = {"step": step, "tag": tag, "value": value, "wall_time": time.time()}
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class MultiWriter(NullWriter):
    """Sends everything to each of ``writers``."""

    def __init__(self, *writers: SummaryWriter) -> None:
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        for w in self.writers:
            w.add_histogram(tag, values, step)

    def add_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        for w in self.writers:
            w.add_images(tag, images, step)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def default_writer(logdir: str | os.PathLike) -> MultiWriter:
    """TensorBoard event files and ``metrics.jsonl`` in ``logdir``: where a run's summaries go by default."""
    logdir = os.fspath(logdir)
    events = TensorBoardWriter(logdir)
    try:
        return MultiWriter(events, JsonlWriter(os.path.join(logdir, "metrics.jsonl")))
    except BaseException:
        events.close()
        raise
