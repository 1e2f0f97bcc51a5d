"""Evaluation: score one checkpoint, or every new checkpoint a training job commits.

:func:`evaluate_once` restores a checkpoint's weights into the model, runs it in
eval mode under ``torch.inference_mode()`` over the data, and writes each
metric as a summary at the checkpoint's global step. :func:`evaluation_loop`
does that for each new checkpoint that :func:`checkpoints_iterator` finds, and
can run as a second process beside ``learning.train``: it only ever sees
committed checkpoints, skips (with a warning) those the trainer's ``max_to_keep``
deleted first, and with ``timeout_fn=stop_when_training_ends(dir)`` it stops
once the trainer's final checkpoint has been evaluated. With ``record=True`` it
records each checkpoint's metrics in the checkpoint directory
(``evaluations.json``, one writer, replaced atomically), where a trainer with a
``learning.train(watch=...)`` reads them to keep the best checkpoints and to
stop early; a restarted recording evaluator resumes at the first checkpoint it
has not recorded. Training and evaluation never import each other; they meet
only through files in the checkpoint directory.

>>> import tempfile
>>> model = torch.nn.Linear(2, 2)
>>> with torch.no_grad():
...     _ = model.weight.copy_(torch.eye(2)), model.bias.zero_()
>>> logdir = tempfile.mkdtemp()
>>> path = checkpoint.Saver().save({"model": model.state_dict()}, logdir, global_step=7)
>>> data = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])),
...         (torch.tensor([[2.0, 1.0], [1.0, 3.0]]), torch.tensor([0, 1]))]
>>> accuracy = lambda predictions, targets: (predictions.argmax(1) == targets).float().mean()
>>> evaluate_once(path, logdir, model, data, metrics={"accuracy": accuracy}, summary_writer=None)
{'accuracy': 0.75}
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchslim import checkpoint, queues, summaries, variables
from torchslim._checks import check_bool, check_callable, check_directory, check_fits, check_positive_int, check_seconds
from torchslim._data import iterate
from torchslim._evalrun import default_eval_fn, evaluating, model_device, run_pass
from torchslim._logs import default_logging
from torchslim._metrics import check_metrics
from torchslim._prefetch import prefetch_depth
from torchslim._records import RecordWriter
from torchslim._types import DEFAULT
from torchslim._watch import (
    DELETED,
    checkpoints_iterator,
    stop_when_training_ends,
    training_finished,
    wait_for_new_checkpoint,
)

__all__ = [
    "EvalConfig",
    "StopAfterNEvalsHook",
    "checkpoints_iterator",
    "evaluate_once",
    "evaluation_loop",
    "stop_when_training_ends",
    "training_finished",
    "wait_for_new_checkpoint",
]

log = logging.getLogger("torchslim")

_HOOK_METHODS = ("begin", "after_batch", "end")


def _methods(objects: Iterable[Any], name: str) -> list[Callable[..., Any]]:
    """The bound ``name`` methods of those ``objects`` that have one (hooks implement any of theirs)."""
    return [m for m in (getattr(o, name, None) for o in objects) if callable(m)]


class StopAfterNEvalsHook:
    """A hook that stops an evaluation after ``num_evals`` batches (as the original's)."""

    def __init__(self, num_evals: int) -> None:
        check_positive_int(num_evals, "num_evals")
        self.num_evals = num_evals

    def after_batch(self, num_batches_done: int) -> bool:
        return num_batches_done >= self.num_evals


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What to evaluate and how: :func:`evaluate_once`'s arguments (see there), checked when it is made.

    ``metrics`` is kept as given; ``metric_objects`` holds each as an object
    with ``update``/``compute``/``reset`` (a plain function wrapped as a batch mean).
    """

    model: torch.nn.Module
    data: Iterable[Any] | None = None
    metrics: Mapping[str, Any] | None = None
    eval_fn: Callable[[Any], tuple[Any, Any]] | None = None
    num_evals: int | None = None
    initial_op: Callable[[], Any] | None = None
    eval_op: Callable[[Any], Any] | None = None
    final_op: Callable[[], Any] | None = None
    variables_to_restore: Any = None
    summary_writer: Any = DEFAULT
    hooks: Iterable[Any] | None = None
    prefetch: bool | int | None = None

    metric_objects: dict[str, Any] = field(init=False)
    restore: list[str] | dict[str, torch.Tensor] | None = field(init=False)
    hook_list: list[Any] = field(init=False)
    prefetch_depth: int = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.data is not None and not isinstance(self.data, Iterable):
            raise TypeError(f"`data` must be an iterable of batches (a DataLoader, a list) or None, "
                            f"got {type(self.data).__name__}")
        check_positive_int(self.num_evals, "num_evals", optional=True)
        for name in ("eval_fn", "initial_op", "eval_op", "final_op"):
            if getattr(self, name) is not None:
                check_callable(getattr(self, name), name)
        object.__setattr__(self, "metric_objects", check_metrics(self.metrics))
        if self.metric_objects and self.data is None:
            raise ValueError("`metrics` need `data` to be computed over; pass the batches as `data`")
        object.__setattr__(self, "restore", _check_restore(self.model, self.variables_to_restore))
        object.__setattr__(self, "hook_list", _check_hooks(self.hooks))
        object.__setattr__(self, "prefetch_depth", prefetch_depth(self.prefetch, self.device()))
        if self.summary_writer not in (DEFAULT, None) and not all(
                callable(getattr(self.summary_writer, m, None)) for m in ("add_scalar", "flush")):
            raise TypeError(f"`summary_writer` must have add_scalar() and flush() (a torchslim.summaries writer) or "
                            f"be None, got {type(self.summary_writer).__name__}")

    def targets(self) -> dict[str, torch.Tensor]:
        """The tensors to restore, looked up afresh (``model.to()`` replaces buffers)."""
        model_vars = variables.get_model_variables(self.model)
        if isinstance(self.restore, list):
            return {n: model_vars[n] for n in self.restore}
        return model_vars if self.restore is None else self.restore

    def device(self) -> torch.device:
        return model_device(self.model)

    def batches(self) -> Iterator[Any]:
        data = itertools.repeat(None) if self.data is None else self.data
        if self.data is None and self.num_evals is None:
            return iter(())
        batches = iterate(data) if self.num_evals is None else itertools.islice(iterate(data), self.num_evals)
        if self.prefetch_depth and self.data is not None:
            device = self.device()
            return queues.prefetch(batches, self.prefetch_depth, device=device if device.type != "cpu" else None)
        return batches

    def open_writer(self, logdir: str | os.PathLike | None) -> tuple[Any, bool]:
        """``(writer, owned)``: the default one (TensorBoard + metrics.jsonl in ``logdir``) is ours to close."""
        if self.summary_writer is None or (self.summary_writer is DEFAULT and logdir is None):
            return summaries.NullWriter(), False
        if self.summary_writer is not DEFAULT or logdir is None:
            return self.summary_writer, False
        return summaries.default_writer(logdir), True


def _check_hooks(hooks: Any) -> list[Any]:
    if not isinstance(hooks, (Iterable, type(None))):
        raise TypeError(f"`hooks` must be a list of hooks, got {type(hooks).__name__}")
    for i, hook in enumerate(hooks := list(hooks or [])):
        if not any(_methods([hook], m) for m in _HOOK_METHODS):
            raise TypeError(f"`hooks[{i}]` ({type(hook).__name__}) has none of the hook methods "
                            f"begin(), after_batch(num_batches_done) -> bool, end(results)")
    return hooks


def _check_restore(model: torch.nn.Module, variables_to_restore: Any) -> list[str] | dict[str, torch.Tensor] | None:
    if variables_to_restore is None:
        return None
    if isinstance(variables_to_restore, Mapping):
        bad = [k for k, v in variables_to_restore.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        if bad:
            raise TypeError(f"`variables_to_restore` must map checkpoint names to tensors; bad entries: {bad!r}")
        return dict(variables_to_restore)
    if isinstance(variables_to_restore, (list, tuple)) and all(isinstance(n, str) for n in variables_to_restore):
        model_vars = variables.get_model_variables(model)
        if unknown := [n for n in variables_to_restore if n not in model_vars]:
            raise ValueError(f"`variables_to_restore` names {unknown} that are not variables of the model; "
                             f"known: {', '.join(model_vars)}")
        return list(variables_to_restore)
    raise TypeError("`variables_to_restore` must be None (all of the model's variables), a list of variable names, "
                    f"or a dict of checkpoint name -> tensor; got {type(variables_to_restore).__name__}")


# ---------------------------------------------------------------- one checkpoint


def _read_checkpoint(path: str | os.PathLike | None) -> tuple[str, dict[str, torch.Tensor], int]:
    """``(checkpoint path, its model variables, its global step)``; a logdir means its latest checkpoint."""
    if path is None:
        raise ValueError("`checkpoint_path` is None, not a checkpoint (did latest_checkpoint() find none?); pass a "
                         "checkpoint, or a logdir to evaluate its latest one")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"`checkpoint_path` {path!r} does not exist")
    is_file = os.path.isfile(path)
    try:
        path, values = variables.checkpoint_variables(path)  # a logdir: the checkpoint checkpoint.restore picks
    except ValueError as e:
        if isinstance(e, checkpoint.CorruptCheckpointError):
            raise
        raise ValueError(f"`checkpoint_path` {path!r}: {e}") from None
    if is_file:
        return path, values, 0
    try:
        step = int(checkpoint.read_metadata(path)["global_step"])
    except ValueError:  # read, then deleted by the trainer's retention: its name still says its step
        step = checkpoint.step_of(path)
    return path, values, step


@contextlib.contextmanager
def _restored(model: torch.nn.Module, targets: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor],
              source: str) -> Iterator[None]:
    """Load ``values`` into ``targets`` and eval mode; afterwards put the old weights, modes and RNG states back."""
    check_fits(targets, values, source, hint="Pass `variables_to_restore` to choose (or rename) the variables")
    with torch.no_grad():
        saved = {n: t.detach().clone() for n, t in targets.items()}
        for n, t in targets.items():
            t.copy_(values[n])
    try:
        with evaluating(model):
            yield
    finally:
        with torch.no_grad():
            for n, t in targets.items():
                t.copy_(saved[n])


def _run(ev: EvalConfig) -> tuple[dict[str, float], int]:
    """The batches through the metrics and ``eval_op``, then ``final_op``: ``(results, batches done)``."""
    stops = _methods(ev.hook_list, "after_batch")
    results, n = run_pass(ev.metric_objects, ev.batches(), ev.eval_fn or default_eval_fn(ev.model),
                          initial_op=ev.initial_op, eval_op=ev.eval_op, final_op=ev.final_op, stops=stops)
    if ev.num_evals is not None and n < ev.num_evals and ev.data is not None and not stops:
        log.info("The data ran out after %d of num_evals=%d batches", n, ev.num_evals)
    return results, n


def _evaluate(ev: EvalConfig, path: str, values: Mapping[str, torch.Tensor], step: int,
              writer: Any) -> dict[str, float]:
    """Restore, run, put the model back; write the results at ``step`` and flush; return them."""
    started = time.monotonic()
    with _restored(ev.model, ev.targets(), values, f"checkpoint {path}"):
        for begin in _methods(ev.hook_list, "begin"):
            begin()
        results, n = _run(ev)
    for tag, value in results.items():
        writer.add_scalar(tag, value, step)
    writer.flush()
    log.info("Evaluated %s (global step %d, %d batches, %.2f s): %s", path, step, n, time.monotonic() - started,
             ", ".join(f"{k} = {v:.4g}" for k, v in results.items()) or "no metrics")
    for end in _methods(ev.hook_list, "end"):
        end(results)
    return results


def evaluate_once(checkpoint_path: str | os.PathLike | None, logdir: str | os.PathLike | None, model: torch.nn.Module,
                  data: Iterable[Any] | None = None, *, metrics: Mapping[str, Any] | None = None,
                  eval_fn: Callable[[Any], tuple[Any, Any]] | None = None, num_evals: int | None = None,
                  initial_op: Callable[[], Any] | None = None, eval_op: Callable[[Any], Any] | None = None,
                  final_op: Callable[[], Any] | None = None, variables_to_restore: Any = None,
                  summary_writer: Any = DEFAULT, hooks: Iterable[Any] | None = None,
                  prefetch: bool | int | None = None) -> dict[str, float]:
    """Restore one checkpoint into ``model``, evaluate it over ``data``, write and return the metrics.

    The model runs in eval mode under ``torch.inference_mode()``; afterwards the
    weights the checkpoint overwrote, every submodule's training flag, every buffer
    and the global RNG states are put back as they were found. Per batch, the
    default path does no host sync.

    Args:
        checkpoint_path: a torchslim checkpoint (``.../model.ckpt-N``) or a logdir (its
            latest); a ``.safetensors``/``state_dict`` file also works (written at step 0).
        logdir: where the default writer puts event files and ``metrics.jsonl``.
        model: the ``nn.Module`` to restore into and run.
        data: an iterable of batches; one that runs out ends the evaluation. ``None``:
            ``num_evals`` batches of ``None``, for an ``eval_op`` that reads its own input.
        metrics: name -> an object with ``update(predictions, targets)``, ``compute()``,
            ``reset()`` (torchmetrics' as they are; reset before and after each
            evaluation), or a plain ``fn(predictions, targets)`` whose value is
            averaged over batches, weighted by batch size. A mapping or vector value
            is written as ``name/key`` or ``name/i``.
        eval_fn: ``batch -> (predictions, targets)``; default: ``inputs, targets = batch``,
            moved to the model's device, then ``(model(inputs), targets)``.
        num_evals: at most this many batches; None: all of ``data``.
        initial_op: called once before the batches.
        eval_op: called with each batch (after the metrics' update).
        final_op: called once at the end; a mapping it returns joins the results,
            a number is added as ``"final_op"``.
        variables_to_restore: a list of the model's variable names, or a dict of
            checkpoint name -> tensor (``variables.get_variables_to_restore``); default:
            all of the model's variables, by their ``state_dict`` names.
        summary_writer: default: TensorBoard + ``metrics.jsonl`` in ``logdir``, closed at
            the end; None: none; or a torchslim summaries writer (flushed, not closed).
        hooks: objects with any of ``begin()``, ``after_batch(num_batches_done) -> bool``
            (True stops) and ``end(results)``, e.g. :class:`StopAfterNEvalsHook`.
        prefetch: draw batches in a background thread (``queues.prefetch``), this many
            ahead (``True``: 2), moved to the model's device. Default: on for a model
            on an accelerator, off on the CPU.

    Returns:
        ``{name: value}``, each also written as a scalar summary at the checkpoint's global step.

    Raises:
        ValueError: ``checkpoint_path`` does not exist or does not fit the model.
        TypeError: an argument of the wrong kind, named in the message.
    """
    config = EvalConfig(model=model, data=data, metrics=metrics, eval_fn=eval_fn, num_evals=num_evals,
                        initial_op=initial_op, eval_op=eval_op, final_op=final_op,
                        variables_to_restore=variables_to_restore, summary_writer=summary_writer, hooks=hooks,
                        prefetch=prefetch)
    check_directory(logdir, "logdir")
    with default_logging():
        path, values, step = _read_checkpoint(checkpoint_path)
        writer, owned = config.open_writer(logdir)
        try:
            return _evaluate(config, path, values, step, writer)
        finally:
            if owned:
                writer.close()


# ---------------------------------------------------------------- the loop


def _read_or_skip(path: str) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """Read a checkpoint the loop was given; None (with a warning) if the trainer deleted it first."""
    for attempt in range(2):
        try:
            return _read_checkpoint(path)
        except (ValueError, OSError) as e:
            if not os.path.isdir(path):
                log.warning(DELETED, path)
                return None
            if attempt:
                log.warning("Cannot read checkpoint %s (%s); skipping it", path, e)
                return None
            time.sleep(0.1)  # it was being replaced in place (re-saved as final): read the new one
    return None


def evaluation_loop(checkpoint_dir: str | os.PathLike, logdir: str | os.PathLike | None, model: torch.nn.Module,
                    data: Iterable[Any] | None = None, *, eval_interval_secs: float = 60,
                    max_number_of_evaluations: int | None = None, timeout: float | None = None,
                    timeout_fn: Callable[[], bool] | None = None, every_checkpoint: bool = False,
                    metrics: Mapping[str, Any] | None = None, eval_fn: Callable[[Any], tuple[Any, Any]] | None = None,
                    num_evals: int | None = None, initial_op: Callable[[], Any] | None = None,
                    eval_op: Callable[[Any], Any] | None = None, final_op: Callable[[], Any] | None = None,
                    variables_to_restore: Any = None, summary_writer: Any = DEFAULT,
                    hooks: Iterable[Any] | None = None, prefetch: bool | int | None = None,
                    record: bool = False) -> dict[str, float] | None:
    """Evaluate each new checkpoint in ``checkpoint_dir`` as :func:`evaluate_once` would.

    One summary writer stays open for all the evaluations (one event file),
    flushed after each. A checkpoint the trainer deleted before it could be read
    is skipped with a warning. Safe beside a live ``learning.train`` on the same
    directory: only committed checkpoints are ever read.

    Args:
        checkpoint_dir: where the trainer commits checkpoints.
        logdir, model, data, metrics, eval_fn, num_evals, initial_op, eval_op, final_op,
            variables_to_restore, summary_writer, hooks, prefetch: as in :func:`evaluate_once`;
            ``data`` must be re-iterable (a DataLoader, a list), not a one-shot iterator.
        eval_interval_secs: at most one evaluation per this many seconds.
        max_number_of_evaluations: stop after this many; None: no limit.
        timeout, timeout_fn, every_checkpoint: as in :func:`checkpoints_iterator`;
            ``timeout_fn=stop_when_training_ends(checkpoint_dir)`` returns after the
            trainer's final checkpoint has been evaluated.
        record: record each checkpoint's results in ``checkpoint_dir/evaluations.json``
            for the trainer (``learning.train(watch=...)``): the best checkpoints are kept by
            them and the run stops on them. One recording evaluator per directory (a second
            raises ``ValueError``); checkpoints it recorded before are skipped, so a
            restarted one goes on where it stopped (with ``every_checkpoint=True``, at the
            first one it has not recorded).

    Returns:
        The last evaluation's results, or None if there was none.
    """
    config = EvalConfig(model=model, data=data, metrics=metrics, eval_fn=eval_fn, num_evals=num_evals,
                        initial_op=initial_op, eval_op=eval_op, final_op=final_op,
                        variables_to_restore=variables_to_restore, summary_writer=summary_writer, hooks=hooks,
                        prefetch=prefetch)
    check_directory(logdir, "logdir")
    if isinstance(data, Iterator):
        raise ValueError(f"`data` is a one-shot iterator ({type(data).__name__}): it would be empty from the second "
                         "evaluation on; pass a re-iterable such as a DataLoader or a list")
    check_positive_int(max_number_of_evaluations, "max_number_of_evaluations", optional=True)
    check_seconds(eval_interval_secs, "eval_interval_secs")
    check_bool(record, "record")
    with default_logging(), contextlib.ExitStack() as stack:
        records = stack.enter_context(RecordWriter(checkpoint_dir)) if record else None
        return _evaluate_each(checkpoints_iterator(checkpoint_dir, eval_interval_secs, timeout, timeout_fn,
                                                   every_checkpoint), config, logdir, max_number_of_evaluations,
                              records)


def _evaluate_each(paths: Generator[str, None, None], config: EvalConfig, logdir: str | os.PathLike | None,
                   max_number_of_evaluations: int | None, records: RecordWriter | None) -> dict[str, float] | None:
    """Evaluate each checkpoint ``paths`` yields, into one writer opened at the first; record them if asked."""
    writer: Any = None
    owned, results, count = False, None, 0
    try:
        for path in paths:
            if records is not None and records.recorded(checkpoint.step_of(path)):
                log.info("Checkpoint %s was evaluated and recorded before; skipping it", path)
                continue
            read = _read_or_skip(path)
            if read is None:
                continue
            if writer is None:
                writer, owned = config.open_writer(logdir)
            results = _evaluate(config, *read, writer)
            if records is not None:
                records.record(read[2], results)
            count += 1
            if max_number_of_evaluations is not None and count >= max_number_of_evaluations:
                break
    finally:
        paths.close()
        if owned:
            writer.close()
    return results
