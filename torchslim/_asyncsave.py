"""What an async save needs: host buffers reused from save to save, and one writer thread at a time.

The training thread copies the state into :class:`Staging` buffers (the only
part of a save it waits for) and hands the rest to :class:`AsyncWriter`: a
thread that checks, writes, fsyncs and commits. At most one save is in flight;
a save due while one is waits for it (logged, counted). An error in the thread
is kept and raised in the training thread by the next ``check``/``wait``,
naming the checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

import torch

from torchslim._types import NonFiniteError

__all__ = ["AsyncWriter", "Staging"]

log = logging.getLogger("torchslim")


class Staging:
    """Host copies of a state's tensors, in buffers allocated on first use and reused while the layout stays.

    CUDA tensors are copied into pinned buffers (without blocking, then one
    synchronize), host tensors with one ``copy_`` each.
    """

    def __init__(self) -> None:
        self._layout: list[tuple[str, tuple[int, ...], torch.dtype, str]] = []
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layout = [(k, tuple(t.shape), t.dtype, t.device.type) for k, t in tensors.items()]
        if layout != self._layout:
            self._buffers = {}  # the old ones go before the new ones are made
            self._buffers = {k: torch.empty(shape, dtype=dtype, pin_memory=device == "cuda" and torch.cuda.is_available())
                             for k, shape, dtype, device in layout}
            self._layout = layout
        on_cuda = False
        with torch.no_grad():
            for key, t in tensors.items():
                on_cuda = on_cuda or t.device.type == "cuda"
                self._buffers[key].copy_(t.detach(), non_blocking=t.device.type == "cuda")
        if on_cuda:
            torch.cuda.synchronize()
        return self._buffers


class AsyncWriter:
    """Runs one save at a time in a background thread; its error waits for the training thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._path: str | None = None
        self._error: tuple[str, BaseException] | None = None
        self.waits = 0
        self.waited_secs = 0.0

    @property
    def in_flight(self) -> str | None:
        """The checkpoint being written, if any."""
        return self._path if self._thread is not None and self._thread.is_alive() else None

    def submit(self, path: str, write: Callable[[], None]) -> None:
        """Start ``write()`` (which commits ``path``) in a new thread; the previous one must be waited for."""
        if self._thread is not None:
            raise RuntimeError("AsyncWriter.submit() with a save still in flight: wait() first")

        def run() -> None:
            try:
                write()
            except BaseException as e:  # kept for the training thread, which raises it
                self._error = (path, e)

        self._path = path
        self._thread = threading.Thread(target=run, name="torchslim-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self, next_path: str | None) -> None:
        """Wait for the save in flight (a wait due to ``next_path`` is logged and counted), then :meth:`check`."""
        thread = self._thread
        if thread is not None:
            if thread.is_alive() and next_path is not None:
                started = time.monotonic()
                thread.join()
                waited = time.monotonic() - started
                self.waits += 1
                self.waited_secs += waited
                log.warning("Waited %.2f s for the async save of %s to finish before saving %s (%d waits so far): "
                            "saves are due faster than they are written", waited, self._path, next_path, self.waits)
            thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        """Raise the error of a save that failed, naming its checkpoint (once)."""
        if self._error is None or (self._thread is not None and self._thread.is_alive()):
            return
        (path, error), self._error = self._error, None
        message = f"the async save of checkpoint {path} failed (the previous checkpoint is still the latest): {error}"
        if isinstance(error, OSError):
            raise OSError(error.errno, message) from error
        if isinstance(error, NonFiniteError):
            raise NonFiniteError(message) from error
        raise RuntimeError(message) from error
