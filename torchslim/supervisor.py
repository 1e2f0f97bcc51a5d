"""A training run's lifecycle: restore or initialize, feed data, save on a policy, stop cleanly.

``learning.train`` is a short loop over :meth:`Supervisor.batches`; everything
around the step lives here:

* **restore or initialize**: the newest readable checkpoint in ``logdir`` is
  restored (model, optimizer, LR scheduler, global step, RNG states, data
  position); without one, ``init_fn`` runs (a warm start).
* **data**: any iterable, re-iterated each epoch. The position (epoch, batches
  taken in it, and the RNG states at the epoch's start) is checkpointed, so a
  resume replays the same shuffle order and skips what was consumed. A
  ``DataLoader`` with ``num_workers=0`` over a map-style dataset skips by
  index, without loading; other iterables skip by drawing batches. Data with its
  own ``state_dict``/``load_state_dict`` (torchdata's ``StatefulDataLoader``)
  is restored through those instead.
* **stop**: at the target step, when the data runs out, on SIGTERM or on the
  first Ctrl-C (a second Ctrl-C interrupts at once, without saving). A final
  checkpoint is written in each of these cases; never after an error.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.data

from torchslim import checkpoint, distributed, queues, summaries
from torchslim._data import DataStream, capture_rng
from torchslim._types import Policy

log = logging.getLogger("torchslim")


# ---------------------------------------------------------------- the supervisor


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What ``train`` decided from its arguments (validated there)."""

    logdir: str | None
    number_of_steps: int | None
    save_policy: Policy
    saver: checkpoint.Saver | None
    init_fn: Callable[..., Any] | None
    init_fn_takes_train_op: bool
    progress_bar: bool
    summary_policy: Policy
    summary_writer: summaries.SummaryWriter | None  # None: the default TensorBoard + metrics.jsonl writer
    summary_op: Callable[[Any], Mapping[str, float]] | None
    trace_policy: Policy
    prefetch_depth: int  # 0: batches are drawn in the loop's own thread
    prefetch_device: torch.device | None
    cluster: distributed.Cluster = distributed.Cluster()
    shard_data: bool = False
    asynchronous: bool = False


class Supervisor:
    """Owns one run of a train op: restore-or-init, services after each step, signals, final save."""

    def __init__(self, train_op: Any, data: Any, config: RunConfig) -> None:
        self.train_op = train_op
        self.config = config
        cluster = config.cluster
        self.stream = DataStream(data, (cluster.rank, cluster.world_size) if config.shard_data else (0, 1))
        self.is_chief = cluster.is_chief
        self._created_group = False
        self._averager: distributed.GradientAverager | None = None
        self._stopped_together = False  # a stop agreed with the other processes of the group
        self.stop_signal: int | None = None
        self._last_saved_step: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._bar: Any = None
        self.summaries = summaries.take_pending()  # those added before training belong to this run
        self.summaries.set_names({id(t): name for name, t in train_op.model_variables().items()})
        self._summaries_due = False
        self._last_summary: tuple[int, float] | None = None
        self._writer: summaries.SummaryWriter = summaries.NullWriter()
        self._trace: Any = None
        self._prefetcher: queues.Prefetcher | None = None
        self._collecting: summaries.collecting | None = None

    # ------------------------------------------------------------ start

    def __enter__(self) -> Supervisor:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        self._collecting = summaries.collecting(self.summaries)
        self._collecting.__enter__()
        self._writer = self._open_writer()
        if not self.config.asynchronous:
            self._created_group = distributed.start(self.config.cluster, self.config.prefetch_device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._collecting is None:
            return  # already closed (finish() closes early to re-deliver SIGTERM)
        if self._prefetcher is not None:
            self._prefetcher.close()  # joins the producer thread: none is left behind
            self._prefetcher = None
        self._restore_signal_handlers()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._trace is not None:
            self._trace.__exit__(None, None, None)
            self._trace = None
        if self._writer is not self.config.summary_writer:
            self._writer.close()  # ours: flush and close; a writer the user gave stays open
        else:
            self._writer.flush()
        self._collecting.__exit__(None, None, None)
        self._collecting = None
        if self._averager is not None:
            self.train_op.gradient_sync = None
            self._averager = None
        distributed.stop(self._created_group)
        self._created_group = False

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _open_writer(self) -> summaries.SummaryWriter:
        if not self.is_chief:
            return summaries.NullWriter()
        if self.config.summary_writer is not None:
            return self.config.summary_writer
        if self.config.logdir is None:
            return summaries.NullWriter()
        return summaries.MultiWriter(summaries.TensorBoardWriter(self.config.logdir),
                                     summaries.JsonlWriter(os.path.join(self.config.logdir, "metrics.jsonl")))

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, no final save
        self.stop_signal = signum
        log.warning("Received %s: stopping after this step and saving a final checkpoint",
                    signal.Signals(signum).name)

    def _find_checkpoint(self) -> tuple[str, dict[str, Any]] | None:
        """The newest readable checkpoint; in a group, the one the chief found, loaded by every process."""
        restored = None
        if self.config.logdir is not None and (self.is_chief or not self.config.cluster.active):
            restored = (self.config.saver or checkpoint.Saver()).restore_latest(self.config.logdir)
        if not self.config.cluster.active or self.config.asynchronous:
            return restored
        path = distributed.broadcast_object(restored[0] if restored else None)
        if path is None or restored is not None:
            return restored
        return path, checkpoint.load(path)

    def restore_or_initialize(self) -> None:
        cluster = self.config.cluster
        group = cluster.active and not self.config.asynchronous
        if group:
            distributed.give_shuffle_a_shared_generator(self.stream.data)
        restored = self._find_checkpoint()
        if restored is not None:
            path, state = restored
            self.train_op.load_state_dict(state)
            self.stream.load_state_dict(state.get("data", {"epoch": 0, "batch": 0}), state.get("rng"))
            self._last_saved_step = self.train_op.step
            log.info("Restored %s (global step %d)", path, self.train_op.step)
        elif self.config.init_fn is not None:
            log.info("No checkpoint in %s: starting fresh and running init_fn", self.config.logdir)
            if self.config.init_fn_takes_train_op:
                self.config.init_fn(self.train_op)
            else:
                self.config.init_fn()
        if group:
            if restored is None:  # every process starts from the chief's weights
                distributed.broadcast_tensors(list(self.train_op.model_variables().values()))
            self._averager = distributed.GradientAverager(self.train_op.trained_parameters, cluster.world_size)
            self.train_op.gradient_sync = self._averager
        self._start_progress_bar()

    def _start_progress_bar(self) -> None:
        if self.config.progress_bar and self.is_chief:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.config.number_of_steps, initial=self.train_op.step, unit="step",
                             dynamic_ncols=True, file=sys.stderr)

    # ------------------------------------------------------------ each step

    def target_reached(self) -> bool:
        n = self.config.number_of_steps
        return n is not None and self.train_op.step >= n

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
        if self.config.prefetch_depth and self.stream.data is not None:
            self._prefetcher = queues.prefetch(self.stream, self.config.prefetch_depth,
                                               device=self.config.prefetch_device, position_fn=self.stream.state_dict)
            return self._prefetcher
        return iter(self.stream)

    def data_position(self) -> dict[str, Any]:
        """Where the loop stands in the data, for a checkpoint."""
        if self._prefetcher is not None:
            return self._prefetcher.position
        return self.stream.state_dict()

    def before_step(self) -> None:
        """Arm what the coming step must record: its summaries, its trace."""
        step = self.train_op.step + 1
        due = self.config.summary_policy.should_trigger(step)
        self._summaries_due = self.train_op.record_losses = due
        self.summaries.begin_step(recording=due)
        if self.config.trace_policy.should_trigger(step) and self.is_chief:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._trace = torch.profiler.profile(activities=activities)
            self._trace.__enter__()

    def after_step(self, loss: torch.Tensor) -> bool:
        """Run the services that are due; return True when the run must stop."""
        step = self.train_op.step
        if self._trace is not None:
            self._write_trace(step)
        if self._summaries_due:
            self.write_summaries(loss)
        self.summaries.end_step()
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if step % 10 == 0:
                self._bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)  # host sync, every 10 steps
        if self.config.save_policy.should_trigger(step):
            self.save()
        if self._averager is not None:
            # In a group, stop only together: the request travels with the next step's gradients.
            self._averager.wants_stop = self.stop_signal is not None
            return self._stop_agreed(step)
        return self.stop_signal is not None

    def _stop_agreed(self, step: int) -> bool:
        # Reading the vote is free on the CPU; on an accelerator it is read every 16 steps, by all alike.
        if self.config.prefetch_device is not None and step % 16:
            return False
        self._stopped_together = self._averager.stop_agreed()
        return self._stopped_together

    def _write_trace(self, step: int) -> None:
        trace, self._trace = self._trace, None
        trace.__exit__(None, None, None)
        if self.config.logdir is not None:
            path = os.path.join(self.config.logdir, f"trace-{step}.json")
            os.makedirs(self.config.logdir, exist_ok=True)
            trace.export_chrome_trace(path)
            log.info("Wrote the trace of global step %d to %s", step, path)

    def write_summaries(self, loss: torch.Tensor | None) -> None:
        """Write the run's scalars and every summary at the current global step (host syncs happen here)."""
        op, step, now = self.train_op, self.train_op.step, time.monotonic()
        scalars: dict[str, float] = {}
        if loss is not None:
            scalars["total_loss"] = loss.item()
        if op.last_losses is not None:
            scalars.update((tag, t.item()) for tag, t in op.last_losses.named())
            op.last_losses = None
        groups = op.optimizer.param_groups
        for i, group in enumerate(groups):
            scalars["learning_rate" if len(groups) == 1 else f"learning_rate/group_{i}"] = float(group["lr"])
        if self._last_summary is not None and now > self._last_summary[1] and step > self._last_summary[0]:
            scalars["global_step/sec"] = (step - self._last_summary[0]) / (now - self._last_summary[1])
        if self.config.summary_op is not None:
            scalars.update(self.config.summary_op(op))
        if op.summarize_gradients and self.summaries.in_step:
            summaries.add_gradients_summaries(op.grads_and_vars())
        summaries.write_summaries(self.summaries, self._writer, step, scalars)
        self._last_summary = (step, now)

    def save(self, final: bool = False) -> None:
        """Commit a checkpoint of the whole run at the current global step (chief only, when a logdir is set)."""
        self.train_op.flush_numerics_check()
        if self.config.logdir is None or self.config.saver is None or not self.is_chief:
            return
        step = self.train_op.step
        state = self.train_op.state_dict()
        state["data"] = self.data_position()
        state["rng"] = capture_rng()
        started = time.monotonic()
        path = self.config.saver.save(state, self.config.logdir, step, final=final)
        self._last_saved_step = step
        log.info("Saved %s in %.2f s", path, time.monotonic() - started)

    # ------------------------------------------------------------ end

    def finish(self, loss: torch.Tensor | None) -> None:
        """The final summaries and checkpoint (unless already written at this step), then re-deliver a stop signal."""
        if loss is not None and (self._last_summary is None or self._last_summary[0] != self.train_op.step):
            self.write_summaries(loss)
        ended_normally = self.stop_signal is None and not self._stopped_together  # target reached or data ran out
        if self._last_saved_step != self.train_op.step or (ended_normally and loss is not None):
            self.save(final=ended_normally)  # the same step again only to mark it final, for evaluators
        else:
            self.train_op.flush_numerics_check()
        if self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.stop_signal == signal.SIGTERM:
            self.__exit__(None, None, None)  # close files, restore the previous handler, deliver SIGTERM to it
            signal.raise_signal(signal.SIGTERM)
