"""Asynchronous updates (Hogwild): forked workers update the chief's shared parameters without waiting.

The original's behaviour without a sync optimizer. The chief (this process)
restores, trains, checkpoints and summarizes; ``world_size - 1`` workers are
forked after the restore, train on their own shard of the data, and stop when
the chief does. Re-exported by :mod:`torchslim.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchslim._checks import check_positive_int
from torchslim._data import DataStream
from torchslim._engine import Engine
from torchslim._types import GlobalStep

log = logging.getLogger("torchslim")


class SharedGlobalStep(GlobalStep):
    """A global step in shared memory, counted by every worker process (one lock per increment)."""

    __slots__ = ("_shared",)

    def __init__(self, value: int = 0, context: Any = None) -> None:
        self._shared = (context or multiprocessing.get_context("fork")).Value("q", value)

    @property
    def value(self) -> int:
        return int(self._shared.value)

    @value.setter
    def value(self, new: int) -> None:
        self._shared.value = new

    def increment(self) -> None:
        with self._shared.get_lock():
            self._shared.value += 1


class Hogwild(Engine):
    """The engine of ``train(sync_optimizer=False, world_size=n)``: n - 1 forked workers beside the chief."""

    def __init__(self, world_size: int, startup_delay_steps: int = 0) -> None:
        super().__init__(0, world_size, True)
        self.startup_delay_steps = startup_delay_steps

    @contextlib.contextmanager
    def workers(self, train_op: Any, data: Any, step_fn: Callable[..., Any],
                step_kwargs: dict[str, Any]) -> Iterator[None]:
        """Share the model, fork the workers; when the block ends, stop and join them (the chief's steps are the block)."""
        for tensor in train_op.model_variables().values():
            tensor.share_memory_()
        own_step, train_op.global_step = train_op.global_step, SharedGlobalStep(train_op.step)
        stop = multiprocessing.get_context("fork").Event()
        kwargs = {**step_kwargs, "log_every_n_steps": None}  # the chief's log is the run's

        def work(index: int) -> None:
            _worker_loop(train_op, data, index, self.world_size, step_fn, kwargs, self.startup_delay_steps, stop)

        try:
            with forked_workers(work, self.world_size):
                try:
                    yield
                finally:
                    stop.set()
        finally:
            own_step.value, train_op.global_step = train_op.step, own_step


def _worker_loop(train_op: Any, data: Any, index: int, num_workers: int, step_fn: Callable[..., Any],
                 kwargs: dict[str, Any], startup_delay_steps: int, stop: Any) -> None:
    """A non-chief worker: wait for the start-up delay, then step on its shard until told to stop."""
    while train_op.step < startup_delay_steps and not stop.is_set():
        stop.wait(0.01)
    stream = DataStream(data, (index, num_workers)) if data is not None else DataStream(None)
    for batch in stream:
        if stop.is_set():
            return
        _, should_stop = step_fn(train_op, batch, kwargs)
        if should_stop:
            return


class forked_workers(contextlib.AbstractContextManager["forked_workers"]):
    """Run ``run(index)`` for index 1 .. num_workers - 1 in forked processes while the block runs.

    On exit each worker is joined; one that has not ended ``stop_grace_period_secs``
    later is killed. A worker that failed or was killed raises ``RuntimeError``
    naming it and its exit code (unless the block itself raised).
    """

    def __init__(self, run: Callable[[int], Any], num_workers: int, stop_grace_period_secs: float = 120) -> None:
        check_positive_int(num_workers, "num_workers")
        self.run, self.num_workers, self.grace = run, num_workers, stop_grace_period_secs
        self.processes: list[Any] = []

    def __enter__(self) -> forked_workers:
        context = multiprocessing.get_context("fork")
        self.processes = [context.Process(target=_worker_main, args=(self.run, i), name=f"torchslim-worker-{i}",
                                          daemon=True) for i in range(1, self.num_workers)]
        for p in self.processes:
            p.start()
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        hung = []
        for p in self.processes:
            p.join(self.grace)
            if p.is_alive():
                p.kill()
                p.join()
                hung.append(p)
        failed = [f"{p.name} ({'did not stop; killed' if p in hung else f'exit code {p.exitcode}'})"
                  for p in self.processes if p in hung or p.exitcode != 0]
        if failed and kind is None:
            raise RuntimeError(f"asynchronous worker(s) failed: {', '.join(failed)}; see their errors above")


def hogwild(run: Callable[[int], Any], num_workers: int, *, stop_grace_period_secs: float = 120) -> Any:
    """Run ``run(worker_index)`` in ``num_workers - 1`` forked processes and in this one (index 0, the chief).

    Before forking, tensors the caller made shared (``model.share_memory()``) are
    seen and updated by all; everything else is copied. The chief's return value
    is returned once every worker has ended; a worker that failed, or that has not
    ended ``stop_grace_period_secs`` after the chief (it is then killed), raises
    ``RuntimeError`` naming it and its exit code. Forking requires the CPU; each
    forked worker computes with one thread.
    """
    with forked_workers(run, num_workers, stop_grace_period_secs):
        return run(0)


def _worker_main(run: Callable[[int], Any], index: int) -> None:
    # Ctrl-C reaches the chief, which then stops the workers; the chief's handlers are not theirs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The parent's OpenMP thread team does not survive a fork; a worker that entered a
    # parallel region with it could hang. One thread per worker also avoids oversubscription.
    torch.set_num_threads(1)
    try:
        run(index)
    except BaseException:
        log.exception("asynchronous worker %d failed", index)
        os._exit(1)
    os._exit(0)  # skip the parent's atexit handlers and finalizers, which belong to the chief
