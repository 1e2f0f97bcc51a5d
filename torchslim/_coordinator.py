"""Input threads with an owner: a Coordinator, and QueueRunners that start and join threads around a block.

As in TF-Slim, background threads fill a queue that a loop drains; a
:class:`Coordinator` lets them request a stop and report an exception to the
main thread; :class:`QueueRunners` starts :class:`QueueRunner` threads around a
block and joins them at its end. Re-exported by :mod:`torchslim.queues`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from torchslim._checks import check_positive_int, check_seconds

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
        check_seconds(stop_grace_period_secs, "stop_grace_period_secs")
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
        check_positive_int(capacity, "capacity")
        check_positive_int(num_threads, "num_threads")
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

    def close(self, timeout_secs: float = _CLOSE_TIMEOUT_SECS) -> None:
        """Stop the threads (a stop request to the coordinator), wake and join them, drop what is queued.

        A thread still inside the producer's ``next()`` after ``timeout_secs`` is
        left to end when that call returns, with a warning. Idempotent; safe to
        call from one of the runner's own threads (a garbage collection there).
        """
        if self._coord is None:
            return
        self._coord.request_stop()
        self._slots.release()  # wakes a producer waiting for a slot now, not at its next poll
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout_secs)
                if t.is_alive():
                    warnings.warn(f"{t.name} is still in the producer's next() after {timeout_secs} s; "
                                  "it ends when that returns", RuntimeWarning, stacklevel=2)
        with contextlib.suppress(queue.Empty):
            while True:  # drop what was made: on an accelerator it holds device memory
                self._queue.get_nowait()


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
        check_seconds(stop_grace_period_secs, "stop_grace_period_secs")
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
