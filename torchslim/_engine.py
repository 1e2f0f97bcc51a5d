"""How a run spreads over processes: the engine, decided from ``train``'s arguments before the first step.

An engine answers the questions a run asks that depend on how many processes
take part and how they cooperate. :class:`Engine` is the single-process one;
``distributed.DataParallel`` (synchronous, gradients averaged every update) and
``_hogwild.Hogwild`` (asynchronous forked workers) override what differs. Another
engine overrides the same few methods:

* ``start``/``close``: join and leave the process group.
* ``find_checkpoint``: which checkpoint every process restores.
* ``prepare``: after the restore, make the processes start equal and return
  the :class:`~torchslim._types.GradientSync` the train op uses for the run
  (where a wrapper such as DDP would be applied).
* ``agree_to_stop``: turn this process's wish to stop into the group's decision.
* ``collective_save``, ``agree_to_save``, ``checkpoint_state``, ``exchange``,
  ``check_logdir``: an engine whose state is sharded (FSDP) saves on every
  process at once, each writing its shards (:mod:`torchslim._shardedio`).
* ``workers``: processes that train beside this one (Hogwild).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torchslim._types import GradientSync, LocalGradients


class Engine:
    """One process: nothing to join, nothing to combine, nobody to agree with."""

    def __init__(self, rank: int = 0, world_size: int = 1, is_chief: bool = True) -> None:
        self.rank, self.world_size, self.is_chief = rank, world_size, is_chief

    def start(self) -> None:
        """Join the process group, if this engine has one (the run calls :meth:`close` at its end)."""

    def close(self) -> None:
        """Leave the process group; wait for anything still in flight."""

    def prepare_data(self, data: Any) -> None:
        """Before the restore: make the data's order the same in every process that shares it."""

    def find_checkpoint(self, find: Callable[[], Any]) -> Any:
        """``(path, state)`` of the checkpoint this process restores, or None; ``find`` looks in the logdir."""
        return find()

    def prepare(self, train_op: Any, restored: bool) -> GradientSync:
        """After the restore (or a fresh start): align the processes; the gradient sync for the run."""
        return LocalGradients()

    collective_save = False  # True: every process writes its shards of each checkpoint, all at the same step

    def agree_to_save(self, due: bool) -> bool:
        """Whether a checkpoint is saved now, given whether this process's policy says so (collective saves)."""
        return due

    def checkpoint_state(self, state: Any) -> Any:
        """The run's state as this process saves it (an engine that shards gives its ``checkpoint.Shard`` s)."""
        return state

    def check_logdir(self, logdir: str | None) -> None:
        """At start: refuse a logdir that the way this engine saves cannot use (collective saves need a shared one)."""

    def exchange(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (a collective where there are several processes)."""
        return [value]

    def agree_to_stop(self, wants_stop: bool, step: int) -> bool:
        """Whether the run stops after ``step``, given whether this process wants it to."""
        return wants_stop

    @contextlib.contextmanager
    def workers(self, train_op: Any, data: Any, step_fn: Callable[..., Any],
                step_kwargs: dict[str, Any]) -> Iterator[None]:
        """Processes that train beside this one for the duration of the block (none here)."""
        yield

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"
