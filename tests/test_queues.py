"""Coordinator, QueueRunner(s) and prefetch, with real threads: nothing is left running, errors surface."""

from __future__ import annotations

import collections
import dataclasses
import gc
import queue
import signal
import threading
import time
import traceback
from typing import NamedTuple

import pytest
import torch
from conftest import wait_until

from torchslim.queues import (
    Coordinator,
    NestedQueueRunnerError,
    QueueRunner,
    QueueRunners,
    prefetch,
)


@pytest.fixture
def no_thread_left():
    """Fail the test if a thread it started is still alive shortly after it ends."""
    before = set(threading.enumerate())
    yield
    gc.collect()  # an iterator dropped by the test is closed by its finalizer
    deadline = time.monotonic() + 2.0
    for t in set(threading.enumerate()) - before:
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in set(threading.enumerate()) - before]
    assert not left, f"threads left running: {left}"


def slow_range(n: int, secs: float = 0.0):
    for i in range(n):
        time.sleep(secs)
        yield i


def failing_producer(n_ok: int, delay: float = 0.0):
    yield from range(n_ok)
    time.sleep(delay)
    raise ValueError("bad record")


# ---------------------------------------------------------------- prefetch: lifetime


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_order_is_kept_and_the_thread_ends(no_thread_left, depth):
    with prefetch(range(500), depth=depth) as batches:
        assert list(batches) == list(range(500))
        assert batches.consumed == 500


def test_early_break_in_a_for_loop_stops_the_thread(no_thread_left):
    for i in prefetch(slow_range(10_000)):
        if i == 3:
            break  # the loop held the only reference: the iterator is collected and closed


def test_close_after_break_stops_a_producer_waiting_for_a_slot(no_thread_left):
    made = []

    def source():
        for i in range(100):
            made.append(i)
            yield i

    p = prefetch(source(), depth=2)
    assert next(p) == 0
    wait_until(lambda: len(made) == 3, "the producer never filled its slots")  # now it waits for a slot
    p.close()  # joins: no wait for the fixture's grace period
    assert not [t for t in threading.enumerate() if t.name.startswith("torchslim-prefetch")]
    assert list(p) == []


def test_a_consumer_error_stops_the_thread(no_thread_left):
    with pytest.raises(ZeroDivisionError):
        for i in prefetch(slow_range(10_000)):
            _ = i / 0


def test_keyboard_interrupt_in_the_consumer_stops_the_thread(no_thread_left):
    with pytest.raises(KeyboardInterrupt):
        with prefetch(slow_range(10_000)) as batches:
            for i in batches:
                if i == 2:
                    raise KeyboardInterrupt


def test_ctrl_c_while_waiting_for_a_batch_stops_the_thread(no_thread_left):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    try:
        with pytest.raises(KeyboardInterrupt):
            timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
            timer.start()
            # The consumer waits in next() when the signal comes; the producer is in
            # the source's own next(), which nothing can interrupt: close() waits it out.
            for _ in prefetch(slow_range(5, secs=0.6)):
                pass
        timer.join()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_dropped_iterator_is_closed_and_closes_its_generator(no_thread_left):
    closed = threading.Event()

    def source():
        try:
            yield from range(1000)
        finally:
            closed.set()

    p = prefetch(source(), depth=2)
    next(p)
    del p
    gc.collect()
    assert closed.wait(2.0)


# ---------------------------------------------------------------- prefetch: errors


def test_a_producer_error_is_the_same_object_after_the_good_batches(no_thread_left):
    got = []
    with pytest.raises(ValueError, match="bad record") as info:
        for b in prefetch(failing_producer(5), depth=3):
            got.append(b)
    assert got == [0, 1, 2, 3, 4]
    names = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "failing_producer" in names


def test_a_producer_error_reaches_a_waiting_consumer_within_a_second(no_thread_left):
    p = prefetch(failing_producer(1, delay=0.3))
    assert next(p) == 0
    start = time.monotonic()
    with pytest.raises(ValueError, match="bad record"):
        next(p)  # blocked here when the producer fails
    assert time.monotonic() - start < 1.0
    assert list(p) == []  # closed after the error


def test_an_error_in_position_fn_reaches_the_consumer(no_thread_left):
    calls = []

    def position():  # the first call, in prefetch() itself, succeeds
        calls.append(1)
        if len(calls) > 1:
            raise LookupError("no position")
        return 0

    with pytest.raises(LookupError, match="no position"):
        list(prefetch(range(3), position_fn=position))


# ---------------------------------------------------------------- prefetch: position and devices


def test_consumed_counts_taken_batches_only(no_thread_left):
    made = []

    def source():
        for i in range(20):
            made.append(i)
            yield i

    with prefetch(source(), depth=4, position_fn=lambda: len(made)) as p:
        assert p.consumed == 0 and p.position == 0
        for _ in range(3):
            next(p)
        wait_until(lambda: len(made) == 3 + 4, "the producer never ran `depth` batches ahead")
        time.sleep(0.1)  # it could run further ahead now, if it were not bounded
        assert len(made) == 3 + 4  # at most `depth` made but not taken
        assert p.consumed == 3 and p.position == 3


class Pair(NamedTuple):
    a: torch.Tensor
    b: list


@dataclasses.dataclass(frozen=True)
class Sample:
    x: torch.Tensor
    label: str


def test_nested_batches_keep_their_types_and_values(no_thread_left):
    batch = {"pair": Pair(torch.ones(2), [torch.zeros(1), 3]), "sample": Sample(torch.arange(3), "cat"),
             "od": collections.OrderedDict(t=(torch.full((2,), 7.0),))}
    (out,) = list(prefetch([batch], device="cpu"))
    assert isinstance(out["pair"], Pair) and isinstance(out["sample"], Sample)
    assert isinstance(out["od"], collections.OrderedDict) and isinstance(out["od"]["t"], tuple)
    assert torch.equal(out["sample"].x, torch.arange(3)) and out["sample"].label == "cat"
    assert out["pair"].b[1] == 3 and torch.equal(out["od"]["t"][0], torch.full((2,), 7.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_on_the_device(no_thread_left):
    data = [(torch.full((256,), float(i)), i) for i in range(8)]
    for i, (x, label) in enumerate(prefetch(data, device="cuda")):
        assert x.is_cuda and label == i and float((x * 2).sum()) == 512.0 * i


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"depth": 0}, ValueError, "`depth` must be positive, got 0"),
    ({"depth": 1.5}, TypeError, "`depth` must be a positive int"),
    ({"device": "gpu-please"}, ValueError, "`device` must name a torch device"),
    ({"pin_memory": True}, ValueError, "`pin_memory=True` only helps copies to an accelerator"),
    ({"pin_memory": "yes"}, TypeError, "`pin_memory` must be a bool"),
    ({"position_fn": 3}, TypeError, "`position_fn` must be callable"),
])
def test_bad_arguments_name_the_argument(no_thread_left, kwargs, error, match):
    with pytest.raises(error, match=match):
        prefetch(range(3), **kwargs)


def test_a_non_iterable_is_refused(no_thread_left):
    with pytest.raises(TypeError, match="`iterable` must be iterable"):
        prefetch(42)


# ---------------------------------------------------------------- Coordinator


def test_join_reraises_a_thread_exception_with_its_traceback(no_thread_left):
    coord = Coordinator()

    def failing_worker():
        with coord.stop_on_exception():
            raise ValueError("worker failed")

    t = threading.Thread(target=failing_worker)
    coord.register_thread(t)
    t.start()
    with pytest.raises(ValueError, match="worker failed") as info:
        coord.join(stop_grace_period_secs=5)
    assert "failing_worker" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert coord.joined


def test_join_names_the_thread_that_did_not_stop(no_thread_left):
    coord, release = Coordinator(), threading.Event()
    stubborn = threading.Thread(target=release.wait, name="stubborn-reader")
    stubborn.start()
    coord.request_stop()
    try:
        with pytest.raises(RuntimeError, match="stubborn-reader"):
            coord.join([stubborn], stop_grace_period_secs=0.1)
        with pytest.warns(RuntimeWarning, match="stubborn-reader"):
            coord.join([stubborn], stop_grace_period_secs=0.1, ignore_live_threads=True)
    finally:
        release.set()
        stubborn.join()


def test_join_waits_for_threads_that_finish_without_a_stop(no_thread_left):
    coord = Coordinator()
    t = threading.Thread(target=time.sleep, args=(0.1,))
    t.start()
    coord.join([t], stop_grace_period_secs=0)
    assert not t.is_alive() and not coord.should_stop()


def test_stop_on_exception_records_the_first_error_and_clear_stop_forgets_it():
    coord = Coordinator()
    with coord.stop_on_exception():
        raise KeyError("first")
    coord.request_stop(ValueError("second"))
    assert coord.should_stop() and coord.wait_for_stop(0)
    with pytest.raises(KeyError, match="first"):
        coord.raise_requested_exception()
    coord.clear_stop()
    assert not coord.should_stop()
    coord.raise_requested_exception()  # nothing recorded any more


def test_stop_on_exception_lets_keyboard_interrupt_through_but_stops():
    coord = Coordinator()
    with pytest.raises(KeyboardInterrupt):
        with coord.stop_on_exception():
            raise KeyboardInterrupt
    assert coord.should_stop()
    coord.raise_requested_exception()  # control flow is not recorded as a failure


def test_wait_for_stop_times_out_quickly():
    start = time.monotonic()
    assert Coordinator().wait_for_stop(0.05) is False
    assert time.monotonic() - start < 0.5


def test_coordinator_arguments_are_checked():
    with pytest.raises(TypeError, match="`ex` must be an exception"):
        Coordinator().request_stop("oops")
    with pytest.raises(TypeError, match="`threads` must hold threading.Thread"):
        Coordinator().join(["t"])
    with pytest.raises(ValueError, match="`stop_grace_period_secs` must be a number of seconds >= 0"):
        Coordinator().join(stop_grace_period_secs=-1)


# ---------------------------------------------------------------- QueueRunner(s)


def test_two_threads_deliver_every_item_exactly_once(no_thread_left):
    work: queue.Queue[int] = queue.Queue()
    for i in range(1000):
        work.put(i)

    def reader():  # each thread's own producer, drawing from the shared work queue
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            time.sleep(0.0001 * (i % 3))
            yield i

    runner = QueueRunner(reader, num_threads=2, capacity=8)
    with QueueRunners(runner) as coord:
        got = list(runner)
        assert list(runner) == []  # the end stays visible
    assert sorted(got) == list(range(1000)) and coord.joined


def test_a_runner_error_reaches_the_consumer_and_the_join(no_thread_left):
    runner = QueueRunner(lambda: failing_producer(3), capacity=2)
    got = []
    with pytest.raises(ValueError, match="bad record"):
        with QueueRunners(runner):
            got.extend(runner)
    assert got == [0, 1, 2]


def test_leaving_the_block_early_stops_an_endless_runner(no_thread_left):
    runner = QueueRunner(lambda: iter(int, 1), num_threads=3, capacity=4)  # zeros forever
    with QueueRunners(runner):
        assert next(iter(runner)) == 0


def test_nesting_is_refused_and_the_flag_is_cleared(no_thread_left):
    with QueueRunners(QueueRunner(range(3))):
        with pytest.raises(NestedQueueRunnerError, match="cannot be nested"):
            with QueueRunners(QueueRunner(range(3))):
                pass
        other_thread = []  # another thread is not nested: it may open its own
        t = threading.Thread(target=lambda: other_thread.append(_open_and_read(QueueRunner(range(2)))))
        t.start()
        t.join()
        assert other_thread == [[0, 1]]
    assert _open_and_read(QueueRunner(range(2))) == [0, 1]  # cleared on exit


def _open_and_read(runner: QueueRunner) -> list:
    with QueueRunners(runner):
        return list(runner)


def test_runner_arguments_are_checked():
    with pytest.raises(TypeError, match="`producer` must be a callable returning an iterable"):
        QueueRunner([1, 2], num_threads=2)
    with pytest.raises(ValueError, match="`capacity` must be positive"):
        QueueRunner(range(2), capacity=0)
    with pytest.raises(TypeError, match="`runners` must be QueueRunner"):
        QueueRunners(range(2))
    with pytest.raises(RuntimeError, match="was not started"):
        list(QueueRunner(range(2)))
