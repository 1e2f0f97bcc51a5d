"""The checks behind ``learning.train``'s arguments, and the :class:`RunConfig` they become.

Every argument is checked here before anything is written or started, so a
mistake raises at the call that made it, naming the argument, the value and
what is accepted. Kept apart from ``learning`` so that ``train`` reads as its
loop.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Mapping, Sized
from typing import Any

import torch
import torch.utils.data.distributed

from torchslim import checkpoint, distributed, policies, summaries
from torchslim._trainop import TrainOp
from torchslim._types import DEFAULT, check_callable, check_positive
from torchslim.supervisor import RunConfig


def _interval(secs: Any, steps: Any, what: str) -> policies.Policy:
    """The policy for 'every ``secs`` seconds or every ``steps`` steps', after checking both."""
    if secs is not None and secs != 0:
        check_positive(secs, f"save_{what}_secs" if what == "summaries" else "save_interval_secs")
    check_positive(steps, f"save_{what}_steps" if what == "summaries" else "save_interval_steps",
                   integer=True, allow_none=True)
    return policies.any_of(policies.every_n_secs(secs) if secs else None,
                           policies.every_n_steps(steps) if steps else None)


def _check_nowhere_to_write(logdir: Any, given: Mapping[str, bool]) -> None:
    if logdir is None:
        for name, is_given in given.items():
            if is_given:
                raise ValueError(f"`{name}` was given but logdir=None: there is nowhere to write; pass a logdir")


def run_config(train_op: Any, logdir: Any, data: Any, **a: Any) -> RunConfig:
    """Check every argument of ``train`` before anything is touched; raise on the first bad one."""
    if not isinstance(train_op, TrainOp):
        raise TypeError(f"`train_op` must be a TrainOp from create_train_op, got {type(train_op).__name__}")
    if train_op.global_step is None:
        raise ValueError("`train_op` does not count steps (global_step=None); train() needs a step counter")
    if logdir is not None and not isinstance(logdir, (str, os.PathLike)):
        raise TypeError(f"`logdir` must be a path or None, got {logdir!r}")
    _check_nowhere_to_write(logdir, {
        "saver": a["saver"] is not None, "save_interval_steps": a["save_interval_steps"] is not None,
        "summary_op": a["summary_op"] not in (DEFAULT, None),
        "summary_writer": a["summary_writer"] not in (DEFAULT, None),
        "trace_every_n_steps": a["trace_every_n_steps"] is not None,
    })
    if data is not None and not isinstance(data, Iterable):
        raise TypeError(f"`data` must be an iterable of batches or None, got {type(data).__name__}")
    check_callable(a["train_step_fn"], "train_step_fn")
    check_positive(a["log_every_n_steps"], "log_every_n_steps", integer=True)
    check_positive(a["number_of_steps"], "number_of_steps", integer=True, allow_none=True)
    check_positive(a["trace_every_n_steps"], "trace_every_n_steps", integer=True, allow_none=True)
    save_policy = _interval(a["save_interval_secs"], a["save_interval_steps"], "interval")
    summary_policy = _interval(a["save_summaries_secs"], a["save_summaries_steps"], "summaries")
    if a["saver"] is not None and not isinstance(a["saver"], checkpoint.Saver):
        raise TypeError(f"`saver` must be a torchslim.checkpoint.Saver, got {type(a['saver']).__name__}")
    if a["summary_op"] not in (DEFAULT, None):
        check_callable(a["summary_op"], "summary_op")
    writer = _check_writer(a["summary_writer"])
    if a["progress_bar"] is not None and not isinstance(a["progress_bar"], bool):
        raise TypeError(f"`progress_bar` must be True, False or None (auto), got {a['progress_bar']!r}")
    takes_op = _check_init_fn(a["init_fn"])
    depth, device = _prefetch_plan(a["prefetch"], train_op)
    cluster, asynchronous = _cluster(a, data, device)
    return RunConfig(
        logdir=None if logdir is None else os.fspath(logdir),
        number_of_steps=a["number_of_steps"],
        save_policy=save_policy if logdir is not None else policies.Never(),
        saver=(a["saver"] or checkpoint.Saver()) if logdir is not None else None,
        init_fn=a["init_fn"],
        init_fn_takes_train_op=takes_op,
        progress_bar=sys.stderr.isatty() if a["progress_bar"] is None else a["progress_bar"],
        summary_policy=policies.Never() if a["summary_op"] is None else summary_policy,
        summary_writer=summaries.NullWriter() if a["summary_op"] is None else writer,
        summary_op=None if a["summary_op"] in (DEFAULT, None) else a["summary_op"],
        trace_policy=policies.any_of(policies.every_n_steps(a["trace_every_n_steps"])
                                     if a["trace_every_n_steps"] else None),
        prefetch_depth=depth,
        prefetch_device=device,
        cluster=cluster,
        shard_data=cluster.world_size > 1 and data is not None and not _sharded_already(data),
        asynchronous=asynchronous,
    )


def _cluster(a: Mapping[str, Any], data: Any, device: torch.device | None) -> tuple[distributed.Cluster, bool]:
    """This process's place in the run, and whether updates are asynchronous; checks the rules that tie them."""
    sync = a["sync_optimizer"]
    if sync is not None and not isinstance(sync, bool):
        raise TypeError(f"`sync_optimizer` must be True, False or None, got {sync!r}")
    delay = a["startup_delay_steps"]
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError(f"`startup_delay_steps` must be an int >= 0, got {delay!r}")
    if sync is not False and delay:
        raise ValueError(f"`startup_delay_steps`={delay} applies to asynchronous updates only; it must be 0 "
                         "with synchronous ones (sync_optimizer=None or True)")
    if sync is False:
        return _async_cluster(a, device), True
    cluster = distributed.resolve_cluster(a["master"], a["rank"], a["world_size"], a["is_chief"])
    if cluster.active and data is not None and not isinstance(data, Sized) and not _sharded_already(data):
        raise ValueError("in a run over several processes `data` must have a len() (e.g. a DataLoader), so that "
                         f"every process takes the same number of steps; got a {type(data).__name__}")
    return cluster, False


def _async_cluster(a: Mapping[str, Any], device: torch.device | None) -> distributed.Cluster:
    if a["master"] is not None:
        raise ValueError("asynchronous updates (sync_optimizer=False) share memory on one machine: `master` must be None")
    world_size = a["world_size"]
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"asynchronous updates need `world_size`, the number of worker processes, got {world_size!r}")
    if device is not None:
        raise ValueError(f"asynchronous updates fork processes that share CPU memory; the model is on {device}")
    return distributed.Cluster(0, world_size, True)


def _sharded_already(data: Any) -> bool:
    return isinstance(getattr(data, "sampler", None), torch.utils.data.distributed.DistributedSampler)


def _prefetch_plan(prefetch: Any, train_op: TrainOp) -> tuple[int, torch.device | None]:
    """``(depth, device)`` for the background data thread; depth 0 means none."""
    if prefetch is not None and not isinstance(prefetch, (bool, int)):
        raise TypeError(f"`prefetch` must be True, False, a positive int (the depth) or None (auto), got {prefetch!r}")
    if isinstance(prefetch, int) and not isinstance(prefetch, bool) and prefetch < 1:
        raise ValueError(f"`prefetch` as a depth must be >= 1, got {prefetch!r} (False turns prefetching off)")
    params = [p for _, p in train_op.named_parameters()]
    device = params[0].device if params and params[0].device.type != "cpu" else None
    if prefetch is None:
        return (2 if device is not None else 0), device
    return (2 if prefetch is True else int(prefetch)), device


def _check_writer(writer: Any) -> summaries.SummaryWriter | None:
    """The writer to use: ``None`` stands for the default one, which the run opens in its logdir."""
    if writer is DEFAULT:
        return None
    if writer is None:
        return summaries.NullWriter()
    missing = [m for m in ("add_scalar", "add_histogram", "add_images", "flush", "close")
               if not callable(getattr(writer, m, None))]
    if missing:
        raise TypeError(f"`summary_writer` must be a torchslim.summaries.SummaryWriter; "
                        f"{type(writer).__name__} lacks {', '.join(missing)}")
    return writer


def _check_init_fn(init_fn: Any) -> bool:
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
