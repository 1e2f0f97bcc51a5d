"""A training run's lifecycle: restore or initialize, feed data, run the services, stop cleanly.

``learning.train`` is a short loop over :meth:`Supervisor.batches`; everything
around the step lives here or in the services it opens:

* **engine**: how the run spreads over processes (one, synchronous data
  parallelism, Hogwild workers), decided from the arguments before anything starts.
* **restore or initialize**: the newest readable checkpoint in ``logdir`` is
  restored (model, optimizer, LR scheduler, global step, RNG states, data
  position); without one, ``init_fn`` runs (a warm start).
* **data**: any iterable, re-iterated each epoch, its position checkpointed
  (see ``_data.DataStream``); batches may be drawn ahead in a background thread.
* **services** (``_services``), opened in this order and closed in reverse:
  signal handling, the engine's process group, summaries, traces, validation
  (``validation``; only when asked for), checkpoints, and the progress bar once
  the starting step is known.
* **stop**: at the target step, when the data runs out, when a watched metric
  stops improving, on SIGTERM or on the first Ctrl-C (a second Ctrl-C
  interrupts at once, without saving). A final checkpoint is written in each of
  these cases; never after an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchslim import checkpoint, distributed, queues, validation
from torchslim._data import DataStream, capture_rng
from torchslim._services import Checkpoints, LogdirHold, ProgressBar, Service, Signals, Summaries, Trace
from torchslim._trainconfig import TrainConfig
from torchslim._trainop import StepResult, TrainOp
from torchslim._types import DEFAULT

log = logging.getLogger("torchslim")


class Supervisor:
    """Owns one run of a train op: the engine, the services, restore-or-init, the data, the final save."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.train_op: TrainOp = config.train_op
        cluster = config.cluster
        self.engine = distributed.engine_for(cluster, config.device, asynchronous=config.asynchronous,
                                             startup_delay_steps=config.startup_delay_steps, sharding=config.sharding)
        self.is_chief = cluster.is_chief
        self.stream = DataStream(config.data, config.shard)
        self.signals = Signals()
        summary_writer = None if config.summary_op is None else config.summary_writer  # summary_op=None: no summaries
        self.summaries = Summaries(self.train_op, config.summary_policy(), summary_writer, config.logdir,
                                   self.is_chief, None if config.summary_op in (DEFAULT, None) else config.summary_op)
        saver = validation.saver_for(config.saver or checkpoint.Saver(), config.watch)
        self.checkpoints = Checkpoints(
            self.train_op, saver if config.logdir is not None else None,
            config.save_policy(), config.logdir, self.is_chief, self.state_dict,
            peers=self.engine if self.engine.collective_save else None)
        self.validation: validation.ValidationService | None = None
        if config.validation is not None or config.watch is not None:
            self.validation = validation.ValidationService(
                config.validation, config.watch, lambda: self.train_op.model, config.logdir, self.is_chief,
                self.checkpoints)
            self.checkpoints.metadata_fn = self.validation.metadata
        self.services: list[Service] = []  # those opened, in the order they act after a step
        # Their bound hooks, only where a service has one: the loop calls these every update.
        self._before: list[Callable[[int], None]] = []
        self._after: list[Callable[[int, StepResult], bool]] = []
        self._prefetcher: queues.Prefetcher | None = None
        self._stopped_by_request = False  # a signal here, or a stop agreed with the other processes
        self._scheduled_epoch = 0  # with lr_scheduler_interval="epoch": the epoch the scheduler was last stepped for
        self._stopped_early_before = False  # the restored checkpoint is the last of a run that stopped early
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------ start

    def __enter__(self) -> Supervisor:
        with contextlib.ExitStack() as stack:
            self._stack = stack
            self._open(self.signals)  # first: Ctrl-C stays ours until everything else is closed
            self._open(LogdirHold(self.config.logdir, self.is_chief))  # before anything is written into it
            self._open(self.engine)
            self.engine.check_logdir(None if self.config.logdir is None else os.fspath(self.config.logdir))
            self._open(self.summaries)
            self._open(Trace(self.config.trace_policy(), self.config.logdir, self.is_chief))
            if self.validation is not None:
                self._open(self.validation)  # before the checkpoints: a save records what it measured
            self._open(self.checkpoints)
            self._stack = stack.pop_all()
        return self

    def _open(self, service: Any) -> None:
        service.start()
        self._stack.callback(service.close)
        if isinstance(service, Service):
            self.services.append(service)
            if type(service).before_step is not Service.before_step:
                self._before.append(service.before_step)
            if type(service).after_step is not Service.after_step:
                self._after.append(service.after_step)

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self._stack.close()
        if kind is None:
            self.signals.redeliver()  # now that everything is saved and closed

    def restore_or_initialize(self) -> None:
        """Restore the newest readable checkpoint, or run ``init_fn``; then align the processes."""
        self.engine.prepare_data(self.stream.data)
        restored = self.engine.find_checkpoint(self._find_checkpoint)
        if restored is not None:
            path, state = restored
            self.train_op.load_state_dict(state)
            self.stream.load_state_dict(state.get("data", {"epoch": 0, "batch": 0}), state.get("rng"))
            if self.validation is not None:
                self.validation.load_state_dict(state.get("validation"))
                self._stopped_early_before = self.validation.stopped_early
            self.checkpoints.last_saved_step = self.train_op.step
            log.info("Restored %s (global step %d)", path, self.train_op.step)
            self._check_batches_per_update(path, state.get("run"))
        elif self.config.init_fn is not None:
            log.info("No checkpoint in %s: starting fresh and running init_fn", self.config.logdir)
            if self.config.init_fn_takes_train_op:
                self.config.init_fn(self.train_op)
            else:
                self.config.init_fn()
        self._scheduled_epoch = int(self.data_position().get("epoch", 0))
        sync = self.engine.prepare(self.train_op, restored is not None)
        self._stack.enter_context(self.train_op.synchronized(sync))
        if self.config.show_progress_bar and self.is_chief:
            status = self.validation.status if self.validation is not None else None
            self._open(ProgressBar(self.config.number_of_steps, self.train_op.step, status))

    def _batches_per_update(self) -> dict[str, int]:
        processes = 1 if self.config.asynchronous else self.engine.world_size  # Hogwild: each worker's own updates
        return {"processes": processes, "accumulate_steps": self.train_op.accumulate_steps}

    def _check_batches_per_update(self, path: str, saved: Any) -> None:
        """Warn when a resume changes how many batches make an update (processes x micro-batches)."""
        now = self._batches_per_update()
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in now):
            return  # a checkpoint of an older release, or not written by train()
        before, after = saved["processes"] * saved["accumulate_steps"], now["processes"] * now["accumulate_steps"]
        if before != after:
            log.warning(
                "%s was written by %d process(es) x %d micro-batch(es) per update, this run has %d x %d: each update "
                "now takes %d batch(es) instead of %d, so the effective batch size (and what the learning rate was tuned "
                "for) changes. To continue the same run, keep processes x accumulate_steps = %d (e.g. "
                "accumulate_steps=%d)", path, saved["processes"], saved["accumulate_steps"], now["processes"],
                now["accumulate_steps"], after, before, before,
                max(1, before // now["processes"]))

    def _find_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
        if self.config.logdir is None:
            return None
        # Tensors go straight into the live model (and optimizer state, if it has any yet) where they fit; the
        # rest (a fresh optimizer's state) gets memory of its own: the first update writes all of it.
        return (self.config.saver or checkpoint.Saver()).restore_latest(
            self.config.logdir, into=self.train_op.state_dict(), check=_check_run_state, mmap=False)

    # ------------------------------------------------------------ each step

    def target_reached(self) -> bool:
        n = self.config.number_of_steps
        return n is not None and self.train_op.step >= n

    def stopped_early_before(self) -> bool:
        """The restored checkpoint is that of a run that stopped early: resuming it has nothing to do."""
        return self._stopped_early_before

    def batches(self) -> Iterator[Any]:
        """The data, batch by batch, until it runs out (nothing at all if the target is already reached).

        With prefetching, a background thread draws the batches (and moves them to
        the device) while the step runs; the data position saved in checkpoints is
        that of the last batch the loop took, not of those drawn ahead.
        """
        if self.target_reached():
            log.info("Global step %d already reaches number_of_steps=%d: nothing to train",
                     self.train_op.step, self.config.number_of_steps)
            return iter(())
        if self.stopped_early_before():
            log.info("This run stopped early at global step %d (%s): nothing to train",
                     self.train_op.step, self.validation.early.stop_reason)  # type: ignore[union-attr]
            return iter(())
        if self.config.prefetch_depth and self.stream.data is not None:
            self._prefetcher = queues.prefetch(self.stream, self.config.prefetch_depth, device=self.config.device,
                                               position_fn=self.stream.state_dict)
            self._stack.callback(self._prefetcher.close)  # joins the producer thread: none is left behind
            return self._prefetcher
        return iter(self.stream)

    def workers(self, step_fn: Any, step_kwargs: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
        """Processes that train beside this one while the loop runs (Hogwild's workers; none otherwise)."""
        return self.engine.workers(self.train_op, self.config.data, step_fn, step_kwargs)

    def before_step(self) -> None:
        """Arm what the coming update must record: its summaries, its trace (once, before its first batch)."""
        if self.train_op.update_in_progress:
            return
        if self.train_op.lr_scheduler is not None and self.train_op.lr_scheduler_interval == "epoch":
            self._step_scheduler_per_epoch()
        step = self.train_op.step + 1
        for before_step in self._before:
            before_step(step)

    def after_step(self, result: StepResult) -> bool:
        """Run the services after an update; return True when the run must stop (the same on every process)."""
        if not result.applied:
            return False  # an inner micro-batch of an accumulated update
        step, wants_stop = self.train_op.step, False
        for after_step in self._after:
            wants_stop = after_step(step, result) or wants_stop
        self._stopped_by_request = self.engine.agree_to_stop(wants_stop, step)
        return self._stopped_by_request

    def data_position(self) -> dict[str, Any]:
        """Where the loop stands in the data: after the last batch it took (not those prefetched)."""
        return self._prefetcher.position if self._prefetcher is not None else self.stream.state_dict()

    def _step_scheduler_per_epoch(self) -> None:
        # The batch about to be used opened a new epoch: step as `for epoch: train(); scheduler.step()` would.
        epoch = self._prefetcher.position["epoch"] if self._prefetcher is not None else self.stream.epoch
        while self._scheduled_epoch < epoch:
            self.train_op.lr_scheduler.step()
            self._scheduled_epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """The whole run, for a checkpoint: the train op's state, the data position, the RNG states."""
        state = self.train_op.state_dict()
        state["data"] = self.data_position()
        state["rng"] = capture_rng()
        state["run"] = self._batches_per_update()
        if self.validation is not None:
            state["validation"] = self.validation.state_dict()
        return self.engine.checkpoint_state(state)

    # ------------------------------------------------------------ end

    def finish(self, result: StepResult | None) -> None:
        """The final summaries and checkpoint (unless already written at this step)."""
        step = self.train_op.step
        if (result is None and self.config.data is not None and not self.target_reached()
                and not self.stopped_early_before()):
            # Not a run that ended: one that never began. Saving now would mark untrained weights final.
            raise ValueError(f"`data` yielded no batch ({type(self.config.data).__name__}); nothing was trained and "
                             "no checkpoint written. Is it empty, or a DataLoader with drop_last=True and fewer "
                             "samples than batch_size?")
        if result is not None and (self.summaries.last_written is None or self.summaries.last_written[0] != step):
            self.summaries.write(step, result)
        stopped_early = self.validation is not None and self.validation.stopped_early
        # Target reached, data ran out, or the watched metric stopped improving: evaluators may stop too.
        ended_normally = not self._stopped_by_request or stopped_early
        if self.checkpoints.last_saved_step != step or (ended_normally and result is not None):
            # The same step again only to mark it final (and say why), for evaluators.
            self.checkpoints.save(final=ended_normally, by_request=not ended_normally)
        else:
            self.train_op.flush_numerics_check()
        self.checkpoints.wait()  # an async save still in flight is committed before train() returns



def _check_run_state(path: str, state: dict[str, Any]) -> None:
    """Refuse a checkpoint that reads back but is not a run's state (then the one before it is tried)."""
    model, optimizer = state.get("model"), state.get("optimizer")
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise checkpoint.CorruptCheckpointError(f"checkpoint {path} is corrupt: its model is not a dict of tensors")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        raise checkpoint.CorruptCheckpointError(f"checkpoint {path} is corrupt: its optimizer is not an optimizer's "
                                                "state_dict (a dict with state and param_groups)")
