"""Validation while training: evaluate on a schedule, keep the best checkpoints, stop early on a plateau.

Two objects, given to :func:`torchslim.learning.train`:

* :class:`Validation`: what to evaluate (held-out ``data`` and ``metrics``, as
  :func:`torchslim.evaluation.evaluate_once` takes them; the model is the train
  op's) and when (every N steps, every N seconds, at each checkpoint save).
  Results go to ``<logdir>/eval`` as ``evaluate_once`` writes them, into the
  log and onto the progress bar. The pass leaves training untouched (mode,
  buffers, gradients and the RNG streams are put back; see ``_evalrun``): a run
  that validates ends with bitwise the same weights as one that does not.
* :class:`Watch`: a metric to watch. The checkpoint written at each evaluation
  records the results in its metadata (committed with it), the saver keeps the
  ``keep_best`` best by the metric beside the newest ``max_to_keep``, and after
  ``patience`` evaluations without an improvement by more than ``min_delta``
  the run stops: a final checkpoint marked with the reason. The best so far and
  the count are part of the checkpointed state, so a run killed and resumed
  stops at the same step as one left alone.

Without a ``Validation``, a ``Watch`` reads the metrics an evaluator in another
process records (``evaluation_loop(..., record=True)``, ``torchslim eval --watch
--record``; TF-Slim's two-job layout): retention keeps the best ``keep_best`` of
the recorded checkpoints, and the run stops on the recorded verdict.

>>> import tempfile
>>> from torchslim import learning, losses
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Linear(2, 2)
>>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,))) for _ in range(4)]
>>> def total_loss(batch):
...     losses.sparse_softmax_cross_entropy(model(batch[0]), batch[1])
...     return losses.get_total_loss()
>>> train_op = learning.create_train_op(total_loss, torch.optim.SGD(model.parameters(), lr=0.1))
>>> accuracy = lambda logits, labels: (logits.argmax(1) == labels).float().mean()
>>> logdir = tempfile.mkdtemp()
>>> _ = learning.train(train_op, logdir, data, number_of_steps=8,
...                    validation=Validation(data[:2], {"accuracy": accuracy}, every_n_steps=4),
...                    watch=Watch("accuracy", keep_best=1))
>>> sorted(checkpoint.read_metrics(logdir))
[4, 8]
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch

from torchslim import _records, checkpoint, policies, summaries
from torchslim._checks import check_bool, check_callable, check_non_negative, check_positive, check_positive_int
from torchslim._evalrun import default_eval_fn, evaluating, run_pass
from torchslim._metrics import check_metrics
from torchslim._services import Checkpoints, Service
from torchslim._trainop import StepResult
from torchslim._types import Policy

__all__ = ["EarlyStopping", "Validation", "Watch"]

log = logging.getLogger("torchslim")


@dataclass(frozen=True)
class Watch:
    """A metric to watch: keep the best checkpoints by it, and stop when it stops improving.

    Args:
        metric: a name the evaluation produces, e.g. ``"accuracy"`` (a metric
            returning a dict produces ``"name/key"``).
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better).
        keep_best: keep this many best checkpoints, beside the saver's newest
            ``max_to_keep`` (0: rank none).
        patience: stop after this many evaluations in a row without an improvement;
            ``None``: never stop early.
        min_delta: an improvement must beat the best so far by more than this.
    """

    metric: str
    _: KW_ONLY
    mode: str = "max"
    keep_best: int = 1
    patience: int | None = None
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise TypeError(f"`metric` must be the name of a metric (a non-empty str), got {self.metric!r}")
        _records.check_mode(self.mode)
        if isinstance(self.keep_best, bool) or not isinstance(self.keep_best, int) or self.keep_best < 0:
            raise ValueError(f"`keep_best` must be a number of checkpoints >= 0, got {self.keep_best!r}")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                                          or self.patience < 1):
            raise ValueError(f"`patience` must be a number of evaluations >= 1 (or None: never stop early), "
                             f"got {self.patience!r}")
        check_non_negative(self.min_delta, "min_delta")

    def as_metadata(self) -> dict[str, str]:
        return {"metric": self.metric, "mode": self.mode}


@dataclass(frozen=True)
class Validation:
    """An evaluation during training: what (``data``, ``metrics``) and when (the schedule).

    Args:
        data: held-out batches, re-iterated at each evaluation (a DataLoader, a list).
        metrics: name -> metric, as :func:`torchslim.evaluation.evaluate_once` takes them.
        every_n_steps: evaluate at every multiple of this many global steps.
        every_n_secs: evaluate when this many seconds have passed since the last time.
        at_checkpoints: evaluate the weights of each checkpoint as it is saved (not
            of the final one written because of a signal: a preempted job should go).
        model: the module to run; default: the train op's (when it owns exactly one).
        eval_fn: ``batch -> (predictions, targets)``; default ``(model(inputs), targets)``.
        num_evals: at most this many batches per evaluation; ``None``: all of ``data``.

    The schedules combine: an evaluation is due when any is. The batches are
    drawn on the training thread (no prefetch), so the RNG streams can be put back.
    """

    data: Iterable[Any] | None
    metrics: Mapping[str, Any] | None
    _: KW_ONLY
    every_n_steps: int | None = None
    every_n_secs: float | None = None
    at_checkpoints: bool = False
    model: torch.nn.Module | None = None
    eval_fn: Callable[[Any], tuple[Any, Any]] | None = None
    num_evals: int | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.every_n_steps, "every_n_steps", optional=True)
        check_positive(self.every_n_secs, "every_n_secs", optional=True)
        check_bool(self.at_checkpoints, "at_checkpoints")
        check_positive_int(self.num_evals, "num_evals", optional=True)
        if self.data is None or not self.metrics:
            raise ValueError("a validation schedule needs an evaluation: pass the held-out `data` and `metrics` "
                             "(e.g. Validation(loader, {'accuracy': fn}, every_n_steps=100))")
        if not isinstance(self.data, Iterable):
            raise TypeError(f"`data` must be an iterable of batches (a DataLoader, a list), "
                            f"got {type(self.data).__name__}")
        if isinstance(self.data, Iterator):
            raise ValueError(f"`data` is a one-shot iterator ({type(self.data).__name__}): it would be empty from "
                             "the second evaluation on; pass a re-iterable such as a DataLoader or a list")
        check_metrics(self.metrics)
        if self.every_n_steps is None and self.every_n_secs is None and not self.at_checkpoints:
            raise ValueError("`Validation` needs a schedule: every_n_steps=N, every_n_secs=S or at_checkpoints=True")
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module or None, got {type(self.model).__name__}")
        if self.eval_fn is not None:
            check_callable(self.eval_fn, "eval_fn")

    def policy(self) -> Policy:
        return policies.any_of(policies.every_n_steps(self.every_n_steps) if self.every_n_steps else None,
                               policies.every_n_secs(self.every_n_secs) if self.every_n_secs else None)

    def produces(self, metric: str) -> bool | None:
        """Whether the metrics produce ``metric``: True, False, or None when only an evaluation can tell."""
        assert self.metrics is not None
        if metric in self.metrics:
            return True
        return None if metric.split("/")[0] in self.metrics else False


class EarlyStopping:
    """The best value so far and the evaluations since it; asks to stop after ``patience`` of them.

    Its state (:meth:`state_dict`) goes into each checkpoint, so that a resumed
    run counts on from where the checkpoint left off.
    """

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.best: float | None = None
        self.best_step: int | None = None
        self.waited = 0  # evaluations since the best
        self.last_step: int | None = None  # the step of the last evaluation counted
        self.stop_reason: str | None = None

    def update(self, step: int, value: float) -> bool:
        """Count the evaluation of ``step``; True when the run should stop."""
        w = self.watch
        self.last_step = step
        if _records.is_better(value, self.best, w.mode, w.min_delta):
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1
        if w.patience is not None and self.waited >= w.patience and self.stop_reason is None:
            self.stop_reason = (f"{w.metric} did not improve on its best ({self.best:.6g} at global step "
                                f"{self.best_step}) by more than {w.min_delta:g} in {w.patience} evaluation(s)")
        return self.stop_reason is not None

    def describe(self) -> str:
        if self.best is None:
            return "no best yet"
        waited = f", {self.waited} of patience {self.watch.patience}" if self.watch.patience else ""
        return f"best {self.best:.4g} at step {self.best_step}{waited}"

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.watch.metric, "best": self.best, "best_step": self.best_step, "waited": self.waited,
                "last_step": self.last_step, "stop_reason": self.stop_reason}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("metric") != self.watch.metric:
            log.warning("The checkpoint watched %r, this run watches %r: counting from scratch",
                        state.get("metric"), self.watch.metric)
            return
        self.best, self.best_step, self.waited = state["best"], state["best_step"], int(state["waited"])
        self.last_step, self.stop_reason = state["last_step"], state["stop_reason"]


def check(validation: Any, watch: Any, *, logdir: str | os.PathLike[str] | None, saver: checkpoint.Saver | None,
          asynchronous: bool) -> None:
    """``learning.train``'s rules for ``validation`` and ``watch``, applied before anything is written."""
    if validation is not None and not isinstance(validation, Validation):
        raise TypeError(f"`validation` must be a torchslim.validation.Validation or None, got {validation!r:.100}")
    if watch is not None and not isinstance(watch, Watch):
        raise TypeError(f"`watch` must be a torchslim.validation.Watch or None, got {watch!r:.100}")
    if validation is not None and asynchronous:
        raise ValueError("`validation` runs on the chief's model, which asynchronous workers (sync_optimizer=False) "
                         "update while it would run; evaluate in another process instead (evaluation_loop)")
    if watch is None:
        return
    if validation is None and logdir is None:
        raise ValueError("`watch` without `validation` reads the metrics an evaluator records in the logdir, but "
                         "logdir=None; pass a logdir, or a `validation` to evaluate in this process")
    if validation is not None and validation.produces(watch.metric) is False:
        raise ValueError(f"`watch` metric {watch.metric!r} is not one the validation produces; "
                         f"it produces: {', '.join(validation.metrics or {})}")
    if saver is not None and saver.keep_best and (saver.metric, saver.mode) != (watch.metric, watch.mode):
        raise ValueError(f"the saver keeps the best by {saver.metric!r} ({saver.mode}) but `watch` watches "
                         f"{watch.metric!r} ({watch.mode}); give one of them only")


def saver_for(saver: checkpoint.Saver, watch: Watch | None) -> checkpoint.Saver:
    """The saver the run uses: ``saver``, keeping the best by the watched metric when there is one."""
    if watch is None or saver.keep_best:
        return saver
    return saver.keeping_best(watch.keep_best, watch.metric, watch.mode)


class ValidationService(Service):
    """In the run: evaluates on the schedule, or follows an evaluator's records; feeds the watch and the saver.

    Acts only on the chief (the process that checkpoints); stops go through the
    engine's stop vote as any other.
    """

    def __init__(self, validation: Validation | None, watch: Watch | None, model: Callable[[], torch.nn.Module],
                 logdir: str | os.PathLike[str] | None, is_chief: bool, checkpoints: Checkpoints) -> None:
        self.validation, self.watch, self.logdir, self.is_chief = validation, watch, logdir, is_chief
        self.checkpoints = checkpoints
        self._model = model
        self.early = EarlyStopping(watch) if watch is not None else None
        self.policy = validation.policy() if validation is not None else policies.every_n_secs(1.0)
        self.metric_objects = check_metrics(validation.metrics) if validation is not None else {}
        self.results: dict[str, float] | None = None  # of the last evaluation
        self.evaluated_step: int | None = None
        self.status: dict[str, str] = {}  # shown on the progress bar
        self._writer: summaries.SummaryWriter | None = None
        self.evaluation_seconds = 0.0  # in the passes themselves; the rest is bookkeeping

    # ------------------------------------------------------------ the run's hooks

    @property
    def stopped_early(self) -> bool:
        return self.early is not None and self.early.stop_reason is not None

    def after_step(self, step: int, result: StepResult) -> bool:
        if not self.is_chief:
            return False
        v = self.validation
        if v is None:
            return self.policy.should_trigger(step) and self._follow_records()
        due = self.policy.should_trigger(step)
        if not due and v.at_checkpoints:
            due = self.checkpoints.due(step)
        if not due:
            return False
        self.evaluate(step)
        if self.watch is not None and self.watch.keep_best:
            self.checkpoints.request_save()  # so that these weights can be kept as a best one
        return self.stopped_early

    def metadata(self, step: int, final: bool, by_request: bool) -> dict[str, Any] | None:
        """What the checkpoint about to be saved at ``step`` records: its metrics, the watch, a stop reason."""
        if not self.is_chief:
            return None
        v = self.validation
        if v is not None and v.at_checkpoints and self.evaluated_step != step and not (final and by_request):
            self.evaluate(step)
        if self.validation is None and final:
            self._follow_records()
        meta: dict[str, Any] = {}
        if self.results is not None and self.evaluated_step == step:
            meta["metrics"] = dict(self.results)
        if self.watch is not None:
            meta["watch"] = self.watch.as_metadata()
        if final and self.stopped_early:
            meta["stop_reason"] = self.early.stop_reason  # type: ignore[union-attr]
        return meta or None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluate the live model at ``step``: results written, logged, shown, and counted by the watch."""
        v = self.validation
        assert v is not None
        model = v.model if v.model is not None else self._model()
        started = time.perf_counter()
        with evaluating(model):
            batches = iter(v.data) if v.num_evals is None else itertools.islice(v.data, v.num_evals)  # type: ignore[arg-type]
            results, n = run_pass(self.metric_objects, batches, v.eval_fn or default_eval_fn(model))
        seconds = time.perf_counter() - started
        self.evaluation_seconds += seconds
        self.results, self.evaluated_step = results, step
        self._write(step, results)
        stopping = self._count(step, results)
        log.info("Validation at global step %d (%d batches, %.2f s): %s%s", step, n, seconds,
                 ", ".join(f"{k} = {val:.4g}" for k, val in results.items()),
                 f" ({self.early.describe()})" if self.early is not None else "")
        if stopping:
            log.warning("Stopping early at global step %d: %s", step, self.early.stop_reason)  # type: ignore[union-attr]
        shown = {k: results[k] for k in ([self.watch.metric] if self.watch is not None else list(results)[:2])}
        self.status.clear()
        self.status.update({k: f"{val:.4g}" for k, val in shown.items()})
        return results

    def _count(self, step: int, results: Mapping[str, float]) -> bool:
        """Count the evaluation for the watch; True when it just decided to stop."""
        if self.watch is None or self.early is None:
            return False
        metric = self.watch.metric
        if metric not in results:
            raise ValueError(f"`watch` metric {metric!r} is not one the validation produces; it produces: "
                             f"{', '.join(results) or 'nothing'}")
        stopped_before = self.stopped_early
        return self.early.update(step, results[metric]) and not stopped_before

    def _write(self, step: int, results: Mapping[str, float]) -> None:
        if self.logdir is None:
            return
        if self._writer is None:  # opened at the first evaluation: a run that never evaluates leaves no files
            self._writer = summaries.default_writer(os.path.join(self.logdir, "eval"))
        for tag, value in results.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    # ------------------------------------------------------------ an evaluator in another process

    def _follow_records(self) -> bool:
        """Count the evaluations recorded since the last one counted, in step order; True to stop."""
        assert self.early is not None and self.watch is not None and self.logdir is not None
        records = _records.read_records(self.logdir)
        last = self.early.last_step
        for step in sorted(s for s in records if last is None or s > last):
            metrics = records[step]
            if self.watch.metric not in metrics:
                raise ValueError(f"`watch` metric {self.watch.metric!r} is not one the evaluator records in "
                                 f"{self.logdir}; it records: {', '.join(metrics) or 'nothing'}")
            if self.early.update(step, metrics[self.watch.metric]):
                log.warning("Stopping: the evaluator's records say %s", self.early.stop_reason)
            log.info("The evaluator recorded global step %d: %s = %.4g (%s)", step, self.watch.metric,
                     metrics[self.watch.metric], self.early.describe())
            self.status.clear()
            self.status[self.watch.metric] = f"{metrics[self.watch.metric]:.4g}"
            if self.stopped_early:
                return True
        return False

    # ------------------------------------------------------------ checkpointed state

    def state_dict(self) -> dict[str, Any]:
        return {"early_stopping": self.early.state_dict()} if self.early is not None else {}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.early is not None and state and "early_stopping" in state:
            self.early.load_state_dict(state["early_stopping"])
