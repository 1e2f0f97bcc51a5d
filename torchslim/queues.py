"""Input threads with an owner: a Coordinator, QueueRunners, and prefetch.

As in TF-Slim, background threads fill a queue that the train loop drains; a
:class:`Coordinator` lets them request a stop and report an exception to the
main thread; :class:`QueueRunners` starts :class:`QueueRunner` threads around a
block and joins them at its end. :func:`prefetch` is the train loop's case:
one ordered producer, at most ``depth`` batches ahead, copying to a device.
Every thread here has an owner that stops and joins it, whatever ends the
loop, and a producer's exception reaches the consumer as the same object.

>>> with prefetch(range(5), depth=2) as batches:
...     [b * 10 for b in batches]
[0, 10, 20, 30, 40]
>>> runner = QueueRunner(lambda: iter("abc"))
>>> with QueueRunners(runner):
...     sorted(runner)
['a', 'b', 'c']
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

import torch

from torchslim._types import check_callable, check_positive

_POLL_SECS = 0.05  # how often a blocked put/get/acquire re-checks its stop flag
_CLOSE_TIMEOUT_SECS = 10.0  # how long close() waits for a producer stuck in the source's next()
_END = object()  # end-of-data sentinel: compared with `is`, never equal to a user's item


class NestedQueueRunnerError(RuntimeError):
    """A ``QueueRunners`` block was opened inside another in the same thread."""


class Coordinator:
    """Lets threads request a stop, report an exception, and be joined with a grace period.

    >>> coord = Coordinator()
    >>> with coord.stop_on_exception():
    ...     raise ValueError("bad record")
    >>> coord.should_stop()
    True
    >>> coord.raise_requested_exception()
    Traceback (most recent call last):
    ...
    ValueError: bad record
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._exc: tuple[BaseException, TracebackType | None] | None = None
        self._threads: set[threading.Thread] = set()
        self._joined = False

    def request_stop(self, ex: BaseException | None = None) -> None:
        """Ask every thread to stop; record ``ex`` if it is the first exception reported.

        Unlike TF, ``ex`` is recorded even after a clean stop: a thread that
        fails while shutting down has a real error.
        """
        if ex is not None and not isinstance(ex, BaseException):
            raise TypeError(f"`ex` must be an exception or None, got {type(ex).__name__}: {ex!r}")
        with self._lock:
            if ex is not None and self._exc is None:
                self._exc = (ex, ex.__traceback__)  # kept apart: a later raise would extend it
            self._stop.set()

    def should_stop(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or ``timeout`` seconds pass; True if it was requested."""
        return self._stop.wait(timeout)

    def clear_stop(self) -> None:
        """Forget the stop request and the recorded exception, so the threads can run again."""
        with self._lock:
            self._exc, self._joined = None, False
            self._stop.clear()

    def register_thread(self, thread: threading.Thread) -> None:
        """Add ``thread`` to those that :meth:`join` waits for."""
        if not isinstance(thread, threading.Thread):
            raise TypeError(f"`thread` must be a threading.Thread, got {type(thread).__name__}")
        with self._lock:
            self._threads.add(thread)

    @property
    def joined(self) -> bool:
        """True once :meth:`join` has run (until :meth:`clear_stop`)."""
        return self._joined

    @contextlib.contextmanager
    def stop_on_exception(self) -> Iterator[None]:
        """Report an ``Exception`` raised in the block and swallow it; the thread then ends cleanly.

        ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` are control
        flow, not failures: they request a stop and propagate.
        """
        try:
            yield
        except Exception as ex:
            self.request_stop(ex)
        except BaseException:
            self.request_stop()
            raise

    def raise_requested_exception(self) -> None:
        """Raise the first reported exception, with its original traceback, if there is one."""
        with self._lock:
            exc = self._exc
        if exc is not None:
            raise exc[0].with_traceback(exc[1])

    def join(self, threads: Iterable[threading.Thread] | None = None, stop_grace_period_secs: float = 120,
             ignore_live_threads: bool = False) -> None:
        """Wait for the registered threads and ``threads``; once a stop is requested, for the grace period.

        Raises:
            BaseException: the first exception reported, with its original traceback (this comes first).
            RuntimeError: naming the threads alive after the grace period (a warning if ``ignore_live_threads``).
        """
        _check_grace(stop_grace_period_secs)
        threads = list(threads or ())
        if not all(isinstance(t, threading.Thread) for t in threads):
            raise TypeError(f"`threads` must hold threading.Thread objects, got {threads!r}")
        with self._lock:
            pending = self._threads | set(threads)
        while any(t.is_alive() for t in pending) and not self._stop.wait(_POLL_SECS):
            pass
        deadline = time.monotonic() + stop_grace_period_secs
        for t in pending:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        stragglers = sorted(t.name for t in pending if t.is_alive())
        with self._lock:
            self._joined = True
            self._threads.clear()
        self.raise_requested_exception()
        if stragglers:
            msg = f"threads still alive {stop_grace_period_secs} s after the stop request: {', '.join(stragglers)}"
            if not ignore_live_threads:
                raise RuntimeError(f"{msg}; make them check should_stop(), or pass ignore_live_threads=True")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _check_grace(secs: object) -> None:
    if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not secs >= 0:
        raise ValueError(f"`stop_grace_period_secs` must be a number >= 0, got {secs!r}")


def _acquire(slots: threading.Semaphore, stopped: Callable[[], bool]) -> bool:
    """Take a slot unless a stop comes first; the timeout keeps a producer from waiting forever."""
    while not stopped():
        if slots.acquire(timeout=_POLL_SECS):
            return not stopped()
    return False


class QueueRunner:
    """Threads that run a producer into a queue; iterate the runner to consume it.

    ``producer`` is a callable returning an iterable or, with one thread, an
    iterable. Each thread calls it and runs its own instance, as each TF
    queue-runner thread ran its own enqueue op: their ``next()`` calls run in
    parallel, which one iterator shared under a lock would serialize. For
    each item once across threads, let the instances draw from one shared
    source (a ``queue.Queue`` of file names). At most ``capacity`` items are
    made but not yet taken. The last thread to finish puts an end sentinel; a
    producer's exception is raised to the consumer once the queue is drained.

    >>> runner = QueueRunner(lambda: range(3), num_threads=2, capacity=4)
    >>> with QueueRunners(runner):
    ...     sorted(runner)
    [0, 0, 1, 1, 2, 2]
    """

    def __init__(self, producer: Iterable[Any] | Callable[[], Iterable[Any]], *, capacity: int = 32,
                 num_threads: int = 1, name: str = "QueueRunner") -> None:
        check_positive(capacity, "capacity", integer=True)
        check_positive(num_threads, "num_threads", integer=True)
        if not callable(producer) and (num_threads > 1 or not isinstance(producer, Iterable)):
            raise TypeError(f"`producer` must be a callable returning an iterable (one per thread), or an "
                            f"iterable with num_threads=1; got {type(producer).__name__}, num_threads={num_threads}")
        self.producer, self.capacity, self.num_threads, self.name = producer, capacity, num_threads, name
        self._coord: Coordinator | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def create_threads(self, coord: Coordinator, *, daemon: bool = True, start: bool = True) -> list[threading.Thread]:
        """Create (and start) this runner's threads under ``coord``, registered with it, on a fresh queue."""
        if not isinstance(coord, Coordinator):
            raise TypeError(f"`coord` must be a Coordinator, got {type(coord).__name__}")
        if any(t.is_alive() for t in self._threads):
            raise RuntimeError(f"{self.name} is already running; stop and join its threads first")
        # An unbounded queue and a semaphore rather than a bounded queue: the bound then
        # covers the item a producer holds while it waits, and the end sentinel always fits.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots = threading.Semaphore(self.capacity)
        self._coord, self._running = coord, self.num_threads
        self._threads = [threading.Thread(target=self._run, args=(coord,), name=f"{self.name}-{i}", daemon=daemon)
                         for i in range(self.num_threads)]
        for t in self._threads:
            coord.register_thread(t)
            if start:
                t.start()
        return list(self._threads)

    def _run(self, coord: Coordinator) -> None:
        try:
            with coord.stop_on_exception():
                items = iter(self.producer() if callable(self.producer) else self.producer)
                try:
                    while _acquire(self._slots, coord.should_stop):
                        self._queue.put(next(items))
                except StopIteration:
                    pass
                finally:  # a generator's `finally` (open files) runs now, in this thread
                    getattr(items, "close", lambda: None)()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._queue.put(_END)

    def __iter__(self) -> Iterator[Any]:
        coord = self._coord
        if coord is None:
            raise RuntimeError(f"{self.name} was not started: use `with QueueRunners(runner):` or create_threads")
        q, slots = self._queue, self._slots
        while True:
            try:  # polled, so that a stop ends the wait even if no sentinel comes
                item = q.get(timeout=_POLL_SECS)
            except queue.Empty:
                if not coord.should_stop():
                    continue
                item = _END  # stopped and drained
            if item is _END:
                q.put(_END)  # so that another consumer, or the next loop, ends too
                coord.raise_requested_exception()
                return
            slots.release()
            yield item


# Values here are per thread, set and cleared by QueueRunners' own `with` (see its docstring).
_thread_state = threading.local()


class QueueRunners:
    """Start runners under one Coordinator; on exit request a stop and join them.

    Nesting is refused per thread with a ``threading.local`` flag, not the
    original's module-wide lock: another thread (an evaluation thread, say)
    may open its own, and the flag is cleared on every exit, where the original
    leaked its lock when ``join`` raised. A ``ContextVar`` would leak the flag
    into threads started inside the block where they inherit context (3.14).

    >>> a, b = QueueRunner(range(2)), QueueRunner(range(3))
    >>> with QueueRunners(a, b) as coord:
    ...     list(a), list(b), coord.should_stop()
    ([0, 1], [0, 1, 2], False)
    """

    def __init__(self, *runners: QueueRunner, coord: Coordinator | None = None,
                 stop_grace_period_secs: float = 120) -> None:
        if not all(isinstance(r, QueueRunner) for r in runners):
            raise TypeError(f"`runners` must be QueueRunner objects, got {runners!r}")
        if coord is not None and not isinstance(coord, Coordinator):
            raise TypeError(f"`coord` must be a Coordinator or None, got {type(coord).__name__}")
        _check_grace(stop_grace_period_secs)
        self.runners, self.stop_grace_period_secs = runners, stop_grace_period_secs
        self.coord = coord if coord is not None else Coordinator()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Coordinator:
        if getattr(_thread_state, "queue_runners_active", False):
            raise NestedQueueRunnerError("QueueRunners cannot be nested in one thread; "
                                         "open one QueueRunners(runner_a, runner_b, ...) with all the runners")
        _thread_state.queue_runners_active = True
        self._threads = []
        try:
            for r in self.runners:
                self._threads += r.create_threads(self.coord)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.coord

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.coord.request_stop()
            self.coord.join(self._threads, self.stop_grace_period_secs)
        finally:
            _thread_state.queue_runners_active = False


# ---------------------------------------------------------------- prefetch


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


def _shutdown(coord: Coordinator, runner: QueueRunner) -> None:
    coord.request_stop()
    runner._slots.release()  # wakes a producer waiting for a slot now, not at its next poll
    for t in runner._threads:
        if t is not threading.current_thread():  # a collection can run this in the producer itself
            t.join(_CLOSE_TIMEOUT_SECS)
            if t.is_alive():
                warnings.warn(f"{t.name} is still in the data source's next() after {_CLOSE_TIMEOUT_SECS} s; "
                              "it ends when that returns", RuntimeWarning, stacklevel=2)
    with contextlib.suppress(queue.Empty):
        while True:  # drop prefetched batches now: on an accelerator they hold its memory
            runner._queue.get_nowait()


class Prefetcher(Iterator[Any], contextlib.AbstractContextManager):  # type: ignore[type-arg]
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
        self._finalize = weakref.finalize(self, _shutdown, coord, runner)

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
    check_positive(depth, "depth", integer=True)
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
