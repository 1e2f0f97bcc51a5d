"""``TrainConfig``: ``learning.train``'s arguments as one frozen object, checked when it is made.

Every rule, including those that tie several arguments together, is applied in
``TrainConfig.__post_init__``, before anything is written or started, so a
mistake raises at the call that made it, naming the argument, the value and
what is accepted. The run's services read their settings from it.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.data.distributed

from torchslim import checkpoint, distributed, policies, validation
from torchslim._checks import (
    check_bool,
    check_callable,
    check_directory,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from torchslim._prefetch import prefetch_depth
from torchslim._trainop import TrainOp
from torchslim._types import DEFAULT, Policy


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What one ``learning.train`` call was asked to do (see its docstring for each argument)."""

    train_op: TrainOp
    logdir: str | os.PathLike[str] | None  # made a str (or left None) by __post_init__
    data: Iterable[Any] | None
    train_step_fn: Callable[..., Any]
    train_step_kwargs: Mapping[str, Any] | None = None
    log_every_n_steps: int = 1
    number_of_steps: int | None = None
    init_fn: Callable[..., Any] | None = None
    summary_op: Any = DEFAULT
    save_summaries_secs: float | None = 600
    save_summaries_steps: int | None = None
    summary_writer: Any = DEFAULT
    saver: checkpoint.Saver | None = None
    save_interval_secs: float | None = 600
    save_interval_steps: int | None = None
    trace_every_n_steps: int | None = None
    prefetch: bool | int | None = None
    progress_bar: bool | None = None
    master: str | None = None
    is_chief: bool | None = None
    rank: int | None = None
    world_size: int | None = None
    sync_optimizer: bool | None = None
    startup_delay_steps: int = 0
    validation: Any = None  # a torchslim.validation.Validation
    watch: Any = None  # a torchslim.validation.Watch
    sharding: str | None = None

    # Decided from the arguments above, in __post_init__.
    device: torch.device | None = field(init=False)  # the model's device, when it is an accelerator
    cluster: distributed.Cluster = field(init=False)
    asynchronous: bool = field(init=False)
    init_fn_takes_train_op: bool = field(init=False)

    def __post_init__(self) -> None:
        self._check_what_and_where()
        self._check_schedule()
        self._check_services()
        self._decide("device", _model_device(self.train_op))
        self._decide("cluster", self._check_processes())
        self._decide("asynchronous", self.sync_optimizer is False)
        validation.check(self.validation, self.watch, logdir=self.logdir, saver=self.saver,
                         asynchronous=self.asynchronous)
        self._check_sharding()

    def _decide(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_what_and_where(self) -> None:
        if not isinstance(self.train_op, TrainOp):
            raise TypeError(f"`train_op` must be a TrainOp from create_train_op, got {type(self.train_op).__name__}")
        if self.train_op.global_step is None:
            raise ValueError("`train_op` does not count steps (global_step=None); train() needs a step counter")
        if self.logdir is not None and not isinstance(self.logdir, (str, os.PathLike)):
            raise TypeError(f"`logdir` must be a path or None, got {self.logdir!r}")
        self._decide("logdir", None if self.logdir is None else os.fspath(self.logdir))
        check_directory(self.logdir, "logdir")
        if self.logdir is None:
            for name, given in (("saver", self.saver is not None),
                                ("save_interval_steps", self.save_interval_steps is not None),
                                ("summary_op", self.summary_op not in (DEFAULT, None)),
                                ("summary_writer", self.summary_writer not in (DEFAULT, None)),
                                ("trace_every_n_steps", self.trace_every_n_steps is not None)):
                if given:
                    raise ValueError(f"`{name}` was given but logdir=None: there is nowhere to write; pass a logdir")
        if self.data is not None and not isinstance(self.data, Iterable):
            raise TypeError(f"`data` must be an iterable of batches or None, got {type(self.data).__name__}")
        if self.data is None and self.train_op.lr_scheduler is not None and self.train_op.lr_scheduler_interval == "epoch":
            raise ValueError("the train op's lr_scheduler_interval='epoch' needs `data`: with data=None there are no "
                             "epochs to step the scheduler at")

    def _check_schedule(self) -> None:
        check_callable(self.train_step_fn, "train_step_fn")
        if self.train_step_kwargs is not None and not isinstance(self.train_step_kwargs, Mapping):
            raise TypeError(f"`train_step_kwargs` must be a dict or None, got {type(self.train_step_kwargs).__name__}")
        check_positive_int(self.log_every_n_steps, "log_every_n_steps")
        check_positive_int(self.number_of_steps, "number_of_steps", optional=True)
        check_positive_int(self.trace_every_n_steps, "trace_every_n_steps", optional=True)
        for secs, steps in (("save_interval_secs", "save_interval_steps"),
                            ("save_summaries_secs", "save_summaries_steps")):
            if getattr(self, secs) != 0:  # 0, as None, means "not by time"
                check_positive(getattr(self, secs), secs, optional=True)
            check_positive_int(getattr(self, steps), steps, optional=True)

    def _check_services(self) -> None:
        if self.saver is not None and not isinstance(self.saver, checkpoint.Saver):
            raise TypeError(f"`saver` must be a torchslim.checkpoint.Saver, got {type(self.saver).__name__}")
        if self.summary_op not in (DEFAULT, None):
            check_callable(self.summary_op, "summary_op")
        if self.summary_writer not in (DEFAULT, None):
            missing = [m for m in ("add_scalar", "add_histogram", "add_images", "flush", "close")
                       if not callable(getattr(self.summary_writer, m, None))]
            if missing:
                raise TypeError(f"`summary_writer` must be a torchslim.summaries.SummaryWriter; "
                                f"{type(self.summary_writer).__name__} lacks {', '.join(missing)}")
        check_bool(self.progress_bar, "progress_bar", optional=True)
        self._decide("init_fn_takes_train_op", _init_fn_takes_train_op(self.init_fn))
        prefetch_depth(self.prefetch, None)  # checks the argument

    def _check_processes(self) -> distributed.Cluster:
        """This process's place in the run; checks the rules that tie the distributed arguments together."""
        check_bool(self.sync_optimizer, "sync_optimizer", optional=True)
        check_non_negative_int(self.startup_delay_steps, "startup_delay_steps")
        if self.sync_optimizer is not False and self.startup_delay_steps:
            raise ValueError(f"`startup_delay_steps`={self.startup_delay_steps} applies to asynchronous updates "
                             "only; it must be 0 with synchronous ones (sync_optimizer=None or True)")
        if self.sync_optimizer is False:
            return self._asynchronous_cluster()
        cluster = distributed.resolve_cluster(self.master, self.rank, self.world_size, self.is_chief)
        if cluster.active and self.data is not None and not isinstance(self.data, Sized) and not self.sharded_already:
            raise ValueError("in a run over several processes `data` must have a len() (e.g. a DataLoader), so that "
                             f"every process takes the same number of steps; got a {type(self.data).__name__}")
        return cluster

    def _check_sharding(self) -> None:
        if self.sharding is None:
            return
        if not isinstance(self.sharding, str):
            raise TypeError(f"`sharding` must be None or 'fsdp', got {self.sharding!r}")
        if self.sharding != "fsdp":
            raise ValueError(f"`sharding` must be None (every process holds the whole model, DDP) or 'fsdp' "
                             f"(parameters and optimizer state sharded, FSDP2), got {self.sharding!r}")
        if self.asynchronous:
            raise ValueError("`sharding`='fsdp' needs synchronous updates; it cannot be used with sync_optimizer=False")
        if not self.cluster.active:
            raise ValueError("`sharding`='fsdp' shards the model over several processes, but this run has one "
                             "(world_size=1): launch it with torchrun, or pass master=, rank= and world_size=")
        if self.validation is not None:
            raise ValueError("`validation` evaluates on the chief alone, but a model sharded by `sharding`='fsdp' "
                             "needs every process for a forward pass: evaluate its checkpoints in another process "
                             "(torchslim eval LOGDIR --watch) instead")
        modules = self.train_op.modules
        in_modules = {id(p) for m in modules.values() for p in m.parameters()}
        loose = [name for name, p in self.train_op.named_parameters() if id(p) not in in_modules]
        if loose:
            raise ValueError(f"`sharding`='fsdp' shards modules; the train op also trains loose tensors "
                             f"({', '.join(loose)}): put them in a module")

    def _asynchronous_cluster(self) -> distributed.Cluster:
        if self.master is not None:
            raise ValueError("asynchronous updates (sync_optimizer=False) share memory on one machine: "
                             "`master` must be None")
        world_size = self.world_size
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"asynchronous updates need `world_size`, the number of worker processes, got {world_size!r}")
        if self.device is not None:
            raise ValueError(f"asynchronous updates fork processes that share CPU memory; the model is on {self.device}")
        return distributed.Cluster(0, world_size, True)

    # ------------------------------------------------------------ what the run reads

    @property
    def sharded_already(self) -> bool:
        """The data is a DataLoader with a DistributedSampler: each process already reads its own share."""
        return isinstance(getattr(self.data, "sampler", None), torch.utils.data.distributed.DistributedSampler)

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of the batches this process takes from the shared order; (0, 1): all."""
        if self.cluster.world_size > 1 and not self.asynchronous and self.data is not None and not self.sharded_already:
            return self.cluster.rank, self.cluster.world_size
        return 0, 1

    @property
    def prefetch_depth(self) -> int:
        return prefetch_depth(self.prefetch, self.device)

    @property
    def show_progress_bar(self) -> bool:
        return sys.stderr.isatty() if self.progress_bar is None else self.progress_bar

    def save_policy(self) -> Policy:
        """When to save (a new policy: its clock starts now)."""
        if self.logdir is None:
            return policies.Never()
        return _every(self.save_interval_secs, self.save_interval_steps)

    def summary_policy(self) -> Policy:
        if self.summary_op is None:
            return policies.Never()
        return _every(self.save_summaries_secs, self.save_summaries_steps)

    def trace_policy(self) -> Policy:
        return policies.any_of(policies.every_n_steps(self.trace_every_n_steps) if self.trace_every_n_steps else None)

    def step_kwargs(self) -> dict[str, Any]:
        """The ``train_step_kwargs`` the step function gets: the defaults, then the user's entries."""
        return {"number_of_steps": self.number_of_steps, "log_every_n_steps": self.log_every_n_steps,
                "logdir": self.logdir, **(self.train_step_kwargs or {})}


def _every(secs: float | None, steps: int | None) -> Policy:
    return policies.any_of(policies.every_n_secs(secs) if secs else None,
                           policies.every_n_steps(steps) if steps else None)


def _model_device(train_op: TrainOp) -> torch.device | None:
    params = [p for _, p in train_op.named_parameters()]
    return params[0].device if params and params[0].device.type != "cpu" else None


def _init_fn_takes_train_op(init_fn: Any) -> bool:
    """Whether ``init_fn`` takes the train op (True) or nothing (False)."""
    if init_fn is None:
        return False
    check_callable(init_fn, "init_fn")
    try:
        signature = inspect.signature(init_fn)
    except (TypeError, ValueError):
        return True
    for args in ((None,), ()):
        try:
            signature.bind(*args)
            return bool(args)
        except TypeError:
            continue
    raise TypeError(f"`init_fn` must take no argument or one (the train op); its signature is {signature}")
