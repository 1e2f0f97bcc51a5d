"""The services of a training run: small objects that act around each optimizer update.

Each has ``start()`` (open what it needs), ``before_step(step)`` and
``after_step(step, result) -> wants_stop`` (called around every update; ``step``
is the global step it produces or produced), and ``close()``. The supervisor
opens them in one ``ExitStack``, so a failure at any point closes exactly what
was opened, in reverse order. A service that has nothing to do on a step costs
one policy question.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchslim import _checkpointdir, checkpoint, summaries
from torchslim._engine import Engine
from torchslim._trainop import StepResult, TrainOp
from torchslim._types import DEFAULT, Policy

log = logging.getLogger("torchslim")


class Service:
    """A part of the run that acts around updates; every method is optional."""

    def start(self) -> None:
        """Open what the service needs (the run closes it with :meth:`close`, even if a later one fails)."""

    def before_step(self, step: int) -> None:
        """Before the batches of the update that will make global step ``step``."""

    def after_step(self, step: int, result: StepResult) -> bool:
        """After the update that made global step ``step``; True asks the run to stop."""
        return False

    def close(self) -> None:
        """Release what :meth:`start` opened."""


class Signals(Service):
    """SIGINT and SIGTERM ask the run to stop after the current update; a second Ctrl-C interrupts at once.

    The handlers are installed by ``start`` (in the main thread only) and the
    previous ones put back by ``close``; :meth:`redeliver` then hands the signal
    to them, once the run has saved and closed everything.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, no final save
        self.received = signum
        log.warning("Received %s: stopping after this step and saving a final checkpoint",
                    signal.Signals(signum).name)

    def after_step(self, step: int, result: StepResult) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def redeliver(self) -> None:
        """Pass a received signal on: Ctrl-C as ``KeyboardInterrupt``, SIGTERM to the handler put back."""
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received == signal.SIGTERM:
            signal.raise_signal(signal.SIGTERM)


class Summaries(Service):
    """The run's summaries: its collection (summaries added before it and during steps) and its writer.

    On the steps its policy makes due, it arms the collection before the update
    (so that summaries added in the loss function are kept) and writes after it:
    the total loss and each named loss, the learning rate, global steps per
    second, ``summary_op``'s scalars and every summary of the collection.
    """

    def __init__(self, train_op: TrainOp, policy: Policy, writer: Any, logdir: str | os.PathLike[str] | None, is_chief: bool,
                 summary_op: Callable[[TrainOp], Mapping[str, float]] | None) -> None:
        self.train_op, self.policy, self.summary_op = train_op, policy, summary_op
        self._given_writer, self._logdir, self._is_chief = writer, logdir, is_chief
        self.writer: summaries.SummaryWriter = summaries.NullWriter()
        self.collection = summaries.SummaryCollection()
        self._collecting: summaries.collecting | None = None
        self._due = False
        self.last_written: tuple[int, float] | None = None  # (global step, monotonic time)

    def start(self) -> None:
        self.collection = summaries.take_pending()  # those added before training belong to this run
        self.collection.set_names({id(t): name for name, t in self.train_op.model_variables().items()})
        self._collecting = summaries.collecting(self.collection)
        self._collecting.__enter__()
        try:
            self.writer = self._open_writer()
        except BaseException:
            self._collecting.__exit__(None, None, None)
            raise

    def _open_writer(self) -> summaries.SummaryWriter:
        if not self._is_chief or self._given_writer is None:
            return summaries.NullWriter()
        if self._given_writer is not DEFAULT:
            return self._given_writer
        return summaries.NullWriter() if self._logdir is None else summaries.default_writer(self._logdir)

    def before_step(self, step: int) -> None:
        self._due = self.policy.should_trigger(step)
        self.collection.begin_step(recording=self._due)

    def after_step(self, step: int, result: StepResult) -> bool:
        if self._due:
            self.write(step, result)
        self.collection.end_step()
        return False

    def write(self, step: int, result: StepResult | None) -> None:
        """Write the run's scalars and every summary at ``step`` (host syncs happen here)."""
        now, op = time.monotonic(), self.train_op
        scalars: dict[str, float] = {}
        if result is not None:
            scalars["total_loss"] = result.loss.item()
            if result.losses is not None:
                scalars.update((tag, t.item()) for tag, t in result.losses.named())
        groups = op.optimizer.param_groups
        for i, group in enumerate(groups):
            scalars["learning_rate" if len(groups) == 1 else f"learning_rate/group_{i}"] = float(group["lr"])
        if self.last_written is not None and now > self.last_written[1] and step > self.last_written[0]:
            scalars["global_step/sec"] = (step - self.last_written[0]) / (now - self.last_written[1])
        scalars.update(op.precision.summary())  # fp16: the loss scale and the updates it skipped
        if self.summary_op is not None:
            scalars.update(self.summary_op(op))
        summaries.write_summaries(self.collection, self.writer, step, scalars)
        self.last_written = (step, now)

    def close(self) -> None:
        try:
            if self.writer is self._given_writer:
                self.writer.flush()  # a writer the user gave stays open
            else:
                self.writer.close()
        finally:
            if self._collecting is not None:
                self._collecting.__exit__(None, None, None)
                self._collecting = None


class Trace(Service):
    """A Chrome trace (``torch.profiler``) of the updates its policy makes due, as ``<logdir>/trace-<step>.json``."""

    def __init__(self, policy: Policy, logdir: str | os.PathLike[str] | None, is_chief: bool) -> None:
        self.policy, self.logdir, self.is_chief = policy, logdir, is_chief
        self._profile: Any = None

    def before_step(self, step: int) -> None:
        if self._profile is None and self.is_chief and self.policy.should_trigger(step):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()

    def after_step(self, step: int, result: StepResult) -> bool:
        if self._profile is not None:
            profile, self._profile = self._profile, None
            profile.__exit__(None, None, None)
            if self.logdir is not None:
                path = os.path.join(self.logdir, f"trace-{step}.json")
                os.makedirs(self.logdir, exist_ok=True)
                profile.export_chrome_trace(path)
                log.info("Wrote the trace of global step %d to %s", step, path)
        return False

    def close(self) -> None:
        if self._profile is not None:
            self._profile.__exit__(None, None, None)
            self._profile = None


class ProgressBar(Service):
    """A tqdm bar on stderr: global steps (of ``number_of_steps``), the loss every 10 updates, steps/s, ETA."""

    def __init__(self, total: int | None, initial: int, status: Mapping[str, str] | None = None) -> None:
        self.total, self.initial = total, initial
        self.status = status if status is not None else {}  # more values to show, e.g. the last validation's
        self._shown: Mapping[str, str] = {}
        self._bar: Any = None

    def start(self) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=self.total, initial=self.initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        # While the bar is shown, log lines are written above it, not into its line.
        self._redirect = logging_redirect_tqdm([lg for lg in (logging.root, log) if lg.handlers])
        self._redirect.__enter__()

    def after_step(self, step: int, result: StepResult) -> bool:
        self._bar.update(step - self._bar.n)
        if step % 10 == 0 or self.status != self._shown:
            self._shown = dict(self.status)
            self._bar.set_postfix(loss=f"{result.loss.item():.4f}", **self.status,  # host sync, every 10 steps
                                  refresh=False)
        return False

    def close(self) -> None:
        self._redirect.__exit__(None, None, None)
        self._bar.close()


class LogdirHold(Service):
    """The chief holds its logdir for the run: a second trainer on it refuses to start, naming the holder.

    See ``_checkpointdir.LogdirLock``: released on any exit, ``kill -9`` included.
    """

    def __init__(self, logdir: str | os.PathLike[str] | None, is_chief: bool) -> None:
        self._lock = _checkpointdir.LogdirLock(os.fspath(logdir)) if logdir is not None and is_chief else None

    def start(self) -> None:
        if self._lock is not None:
            self._lock.acquire()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()


class Checkpoints(Service):
    """Saves the run's state on its policy, and a final checkpoint at the end (only the chief writes).

    ``state_fn()`` gives the state to save; before any save the train op's
    deferred NaN check is read, so that a checkpoint never holds a run that went bad.
    ``metadata_fn(step, final, by_request)``, called before ``state_fn``, gives what
    the checkpoint's metadata records (a validation's metrics, a stop reason).
    With ``peers`` (a sharded engine), every process saves at the steps the
    chief decides (``peers.agree_to_save``), each writing its own shards of the
    checkpoint (``Saver.save_sharded``), the chief committing it.
    """

    def __init__(self, train_op: TrainOp, saver: checkpoint.Saver | None, policy: Policy,
                 logdir: str | os.PathLike[str] | None,
                 is_chief: bool, state_fn: Callable[[], dict[str, Any]],
                 metadata_fn: Callable[[int, bool, bool], dict[str, Any] | None] | None = None,
                 peers: Engine | None = None) -> None:
        self.train_op, self.saver, self.policy = train_op, saver, policy
        self.logdir, self.is_chief, self.state_fn = logdir, is_chief, state_fn
        self.metadata_fn = metadata_fn
        self.peers = peers
        self.last_saved_step: int | None = None
        self._due: tuple[int, bool] = (-1, False)  # the policy's answer for a step, asked once
        self._requested = False

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after ``step`` (the policy is asked once per step, whoever asks first)."""
        if self._due[0] != step:
            self._due = (step, self.policy.should_trigger(step) or self._requested)
        return self._due[1]

    def request_save(self) -> None:
        """Save after the current step, whatever the policy says (e.g. weights just validated)."""
        self._requested = True
        self._due = (self._due[0], True)

    def after_step(self, step: int, result: StepResult) -> bool:
        if self.saver is not None:
            self.saver.check()  # an async save that failed since the last step: raise it here, naming it
        due = self.due(step)
        if self.peers is not None:
            due = self.peers.agree_to_save(due)
        if due:
            self._requested = False
            self.save()
        return False

    def wait(self) -> None:
        """Wait for an async save in flight (raising its error)."""
        if self.saver is not None:
            self.saver.wait()

    def close(self) -> None:
        # After an error elsewhere: still let a save in flight commit, but never mask that error with its own.
        if self.saver is not None:
            try:
                self.saver.wait()
            except Exception as e:
                log.error("%s", e)

    def save(self, final: bool = False, by_request: bool = False) -> None:
        """Commit a checkpoint at the current global step (chief only, when there is a logdir).

        ``by_request``: the run is ending because it was asked to (a signal).
        """
        self.train_op.flush_numerics_check()
        if self.logdir is None or self.saver is None or (not self.is_chief and self.peers is None):
            return
        step = self.train_op.step
        started, again = time.monotonic(), step == self.last_saved_step
        metadata = self.metadata_fn(step, final, by_request) if self.metadata_fn is not None and self.is_chief else None
        if again and final:  # the weights of this step are committed already: mark them final (the chief)
            path = self.saver.mark_final(self.logdir, step, metadata=metadata) if self.is_chief else ""
        elif self.peers is not None:  # every process writes its shards, the chief commits
            path = self.saver.save_sharded(self.state_fn(), self.logdir, step, self.peers, final=final,
                                           metadata=metadata)
        else:
            path = self.saver.save(self.state_fn(), self.logdir, step, final=final, metadata=metadata)
        self.last_saved_step = step
        if not self.is_chief:
            return
        if again:  # the run ended right after a periodic save: the same step, now marked final for evaluators
            log.info("Marked %s as the final checkpoint of the run", path)
        elif self.saver.async_save and not final:
            log.info("Saving %s in the background (the step waited %.3f s)", path, time.monotonic() - started)
        else:
            log.info("Saved %s in %.2f s", path, time.monotonic() - started)
