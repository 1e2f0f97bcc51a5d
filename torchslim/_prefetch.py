"""Prefetching: the train loop's input thread, one ordered producer a few batches ahead.

:func:`prefetch` draws batches from any iterable in a background thread (a
one-thread :class:`~torchslim.queues.QueueRunner`), at most ``depth`` ahead, and
moves them to a device (from pinned memory on a side stream for CUDA, so the
copy overlaps the step). Its thread is owned: whatever ends the loop stops and
joins it, and a producer's exception reaches the consumer as the same object.
Re-exported by :mod:`torchslim.queues`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from torchslim._checks import check_callable, check_positive_int
from torchslim._coordinator import Coordinator, QueueRunner


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists, dicts, namedtuples and dataclasses."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        out = {} if type(obj) is dict else copy.copy(obj)  # a copy keeps OrderedDict/defaultdict's type
        for k, v in obj.items():
            out[k] = _map_tensors(v, fn)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **fields)
    return obj


class _Transfer:
    """Copies batches to a device in the producer thread; on CUDA on a side stream, so copies overlap compute."""

    def __init__(self, device: torch.device, pin_memory: bool, non_blocking: bool) -> None:
        self.device, self.pin_memory, self.non_blocking = device, pin_memory, non_blocking
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def to_device(self, batch: Any) -> tuple[Any, Any]:
        """Producer side: the moved batch, and a handle for :meth:`ready` (None off CUDA)."""
        if self.stream is None:
            return _map_tensors(batch, self._copy), None
        moved: list[torch.Tensor] = []

        def copy_and_keep(t: torch.Tensor) -> torch.Tensor:
            moved.append(self._copy(t))
            return moved[-1]

        with torch.cuda.stream(self.stream):
            out = _map_tensors(batch, copy_and_keep)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, (done, moved)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        if self.pin_memory and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()  # a non-blocking copy is only asynchronous from pinned pages
        return t.to(self.device, non_blocking=self.non_blocking)

    def ready(self, handle: Any) -> None:
        """Consumer side: order the consumer's stream after the copy. A device-side wait, no host sync."""
        if handle is None:
            return
        done, tensors = handle
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for t in tensors:  # allocated on the copy stream: keep the allocator from reusing them too early
            t.record_stream(stream)


class Prefetcher(Iterator[Any], contextlib.AbstractContextManager["Prefetcher"]):
    """The iterator :func:`prefetch` returns: a one-thread :class:`QueueRunner` that closes itself."""

    def __init__(self, iterable: Iterable[Any], depth: int, transfer: _Transfer | None,
                 position_fn: Callable[[], Any] | None) -> None:
        try:
            source = iter(iterable)
        except TypeError as e:
            raise TypeError(f"`iterable` must be iterable (a DataLoader, a list, a generator), "
                            f"got {type(iterable).__name__}") from e
        self._transfer, self._consumed, self._closed = transfer, 0, False
        self._position = position_fn() if position_fn is not None else None

        def produce() -> Iterator[tuple[Any, Any, Any]]:  # refers to no Prefetcher, so one can be collected
            try:
                for batch in source:
                    moved, handle = transfer.to_device(batch) if transfer is not None else (batch, None)
                    yield moved, handle, position_fn() if position_fn is not None else None
            finally:
                getattr(source, "close", lambda: None)()

        coord, runner = Coordinator(), QueueRunner(produce, capacity=depth, name="torchslim-prefetch")
        runner.create_threads(coord)
        self._items = iter(runner)
        self._finalize = weakref.finalize(self, runner.close)

    @property
    def consumed(self) -> int:
        """Batches handed to the consumer; those prefetched but not yet taken are not counted."""
        return self._consumed

    @property
    def position(self) -> Any:
        """``position_fn()`` as the producer saw it right after making the last batch taken (None without one)."""
        return self._position

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:  # a producer's exception comes out here as the same object, with its traceback
            batch, handle, position = next(self._items)
        except BaseException:
            self.close()
            raise
        if handle is not None:
            self._transfer.ready(handle)  # type: ignore[union-attr]
        self._consumed += 1
        self._position = position
        return batch

    def close(self) -> None:
        """Stop the producer, drop what it prefetched, and join its thread. Idempotent."""
        self._closed = True
        self._finalize()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def prefetch(iterable: Iterable[Any], depth: int = 2, device: torch.device | str | int | None = None,
             pin_memory: bool | None = None, non_blocking: bool = True, *,
             position_fn: Callable[[], Any] | None = None) -> Prefetcher:
    """Iterate ``iterable`` in a background thread, in order, at most ``depth`` batches ahead.

    The thread starts at once and moves each batch (tensors, and nested tuples,
    lists, dicts, namedtuples, dataclasses of them) to ``device``; for CUDA from
    pinned memory on a side stream, so the copy overlaps the step. Ending early
    (``break``, an error, Ctrl-C, ``close()``, the ``with`` block's end, the
    iterator's collection) stops and joins the thread. A producer's exception
    is raised after the batches made before it, as without prefetching.

    For exact resume, checkpoint ``consumed`` or ``position``: ``position_fn``
    (e.g. a loader's ``state_dict``) is called in the producer right after each
    batch is made, and ``position`` is the value that came with the last batch
    *taken*: prefetched batches not yet taken never count.

    Args:
        iterable: the data: a ``DataLoader``, a list, a generator...
        depth: how many batches may be made but not yet taken (>= 1).
        device: where to move tensors; None leaves them where they are.
        pin_memory: pin host tensors before the copy; default: True for CUDA.
        non_blocking: copy asynchronously where the device allows it.
        position_fn: called after each batch is made; its value becomes ``position``.

    Returns:
        A :class:`Prefetcher`: an iterator and a context manager.

    Raises:
        TypeError: ``iterable`` is not iterable, or an argument has the wrong type.
        ValueError: ``depth`` < 1, an unknown or unavailable ``device``, or
            ``pin_memory=True`` without an accelerator ``device``.

    >>> with prefetch(iter([[1, 2], [3]]), depth=1, position_fn=lambda: "pos") as p:
    ...     first = next(p)
    ...     first, p.consumed, p.position
    ([1, 2], 1, 'pos')
    """
    check_positive_int(depth, "depth")
    if position_fn is not None:
        check_callable(position_fn, "position_fn")
    return Prefetcher(iterable, depth, _make_transfer(device, pin_memory, non_blocking), position_fn)


def _make_transfer(device: Any, pin_memory: bool | None, non_blocking: bool) -> _Transfer | None:
    if pin_memory is not None and not isinstance(pin_memory, bool):
        raise TypeError(f"`pin_memory` must be a bool or None, got {pin_memory!r}")
    if not isinstance(non_blocking, bool):
        raise TypeError(f"`non_blocking` must be a bool, got {non_blocking!r}")
    try:
        dev = None if device is None else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device` must name a torch device ('cpu', 'cuda', 'cuda:1', ...), got {device!r}") from e
    if pin_memory and (dev is None or dev.type == "cpu"):
        raise ValueError(f"`pin_memory=True` only helps copies to an accelerator `device`, got device={device!r}")
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}`: CUDA is not available here; pass device=None or 'cpu'")
    if dev is None:
        return None
    return _Transfer(dev, dev.type == "cuda" if pin_memory is None else pin_memory, non_blocking)


def prefetch_depth(prefetch: Any, device: torch.device | None) -> int:
    """How many batches a run draws ahead (0: none) from its ``prefetch`` argument and the model's device.

    ``None`` (the default) means 2 for a model on an accelerator, where loading
    and copies overlap the step, and none on the CPU, where a DataLoader's
    workers already load in the background and exact resume stays simple;
    ``True`` means 2, ``False`` none, an int that depth.
    """
    if prefetch is None:
        return 2 if device is not None and device.type != "cpu" else 0
    if isinstance(prefetch, bool):
        return 2 if prefetch else 0
    if not isinstance(prefetch, int):
        raise TypeError(f"`prefetch` must be True, False, a positive int (the depth) or None (auto), got {prefetch!r}")
    if prefetch < 1:
        raise ValueError(f"`prefetch` as a depth must be >= 1, got {prefetch!r} (False turns prefetching off)")
    return prefetch
