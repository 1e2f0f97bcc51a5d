"""Evaluation: score one checkpoint, or every new checkpoint a training job commits.

:func:`evaluate_once` restores a checkpoint's weights into the model, runs it in
eval mode under ``torch.inference_mode()`` over the data, and writes each
metric as a summary at the checkpoint's global step. :func:`evaluation_loop`
does that for each new checkpoint that :func:`checkpoints_iterator` finds, and
can run as a second process beside ``learning.train``: it only ever sees
committed checkpoints, skips (with a warning) those the trainer's ``max_to_keep``
deleted first, and with ``timeout_fn=stop_when_training_ends(dir)`` it stops
once the trainer's final checkpoint has been evaluated. Training and evaluation
never import each other; they meet only through checkpoint files.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from torchslim import checkpoint, queues, summaries, variables
from torchslim._types import check_callable, check_positive

__all__ = [
    "StopAfterNEvalsHook",
    "checkpoints_iterator",
    "evaluate_once",
    "evaluation_loop",
    "stop_when_training_ends",
    "training_finished",
    "wait_for_new_checkpoint",
]

log = logging.getLogger("torchslim")

_DEFAULT: Any = type("_Default", (), {"__repr__": lambda self: "<default>"})()
_HOOK_METHODS = ("begin", "after_batch", "end")
_DELETED = "Checkpoint %s was deleted before it could be evaluated (the trainer's max_to_keep?); skipping it"


def _methods(objects: Iterable[Any], name: str) -> list[Callable[..., Any]]:
    """The bound ``name`` methods of those ``objects`` that have one (hooks implement any of theirs)."""
    return [m for m in (getattr(o, name, None) for o in objects) if callable(m)]


class StopAfterNEvalsHook:
    """A hook that stops an evaluation after ``num_evals`` batches (as the original's)."""

    def __init__(self, num_evals: int) -> None:
        check_positive(num_evals, "num_evals", integer=True)
        self.num_evals = num_evals

    def after_batch(self, num_batches_done: int) -> bool:
        return num_batches_done >= self.num_evals


class _BatchMean:
    """A plain ``fn(predictions, targets)`` as a metric: its mean over batches, weighted by batch size.

    Sums stay on the device (no host sync per batch); they are read once, in ``compute``.
    """

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.total: Any = 0.0
        self.count = 0

    def update(self, predictions: Any, targets: Any) -> None:
        value, n = self.fn(predictions, targets), _batch_size(targets)
        if isinstance(self.total, torch.Tensor):
            self.total.add_(value, alpha=n)  # one kernel per batch, summed in float64
        elif isinstance(value, torch.Tensor):  # float64 where the device has it
            self.total = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64) * n
        else:
            self.total += value * n
        self.count += n

    def compute(self) -> Any:
        return self.total / self.count if self.count else float("nan")


def _batch_size(targets: Any) -> int:
    if isinstance(targets, torch.Tensor):
        return targets.shape[0] if targets.dim() else 1
    return len(targets) if hasattr(targets, "__len__") else 1


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def _scalars(name: str, value: Any, what: str) -> dict[str, float]:
    """A value as ``{tag: float}``: a mapping's entries become ``name/key``, a vector's ``name/i``."""
    join = (lambda k: f"{name}/{k}") if name else str
    if isinstance(value, Mapping):
        return {tag: v for k, item in value.items() for tag, v in _scalars(join(k), item, what).items()}
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return {join(i): v for i, v in enumerate(value.detach().flatten().tolist())}
    if isinstance(value, (torch.Tensor, int, float)):
        return {name: float(value)}  # host sync: once per metric per evaluation
    raise TypeError(f"{what} gave a {type(value).__name__}; expected a number, a tensor or a dict of them")


class _Evaluation:
    """What to evaluate and how (:func:`evaluate_once`'s arguments), checked once where they are given."""

    KEYWORDS = ("metrics", "eval_fn", "num_evals", "initial_op", "eval_op", "final_op", "variables_to_restore", "hooks",
                "prefetch")

    @classmethod
    def from_kwargs(cls, caller: str, model: Any, data: Any, kwargs: Mapping[str, Any]) -> _Evaluation:
        if unknown := sorted(set(kwargs) - set(cls.KEYWORDS)):
            raise TypeError(f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"it takes evaluate_once's: {', '.join(cls.KEYWORDS)}")
        return cls(model, data, **kwargs)

    def __init__(self, model: torch.nn.Module, data: Iterable[Any] | None = None, *, metrics: Any = None,
                 eval_fn: Callable[[Any], tuple[Any, Any]] | None = None, num_evals: int | None = None,
                 initial_op: Callable[[], Any] | None = None, eval_op: Callable[[Any], Any] | None = None,
                 final_op: Callable[[], Any] | None = None, variables_to_restore: Any = None,
                 hooks: Iterable[Any] | None = None, prefetch: bool | int | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if data is not None and not isinstance(data, Iterable):
            raise TypeError(f"`data` must be an iterable of batches (a DataLoader, a list) or None, "
                            f"got {type(data).__name__}")
        check_positive(num_evals, "num_evals", allow_none=True, integer=True)
        for name, fn in (("eval_fn", eval_fn), ("initial_op", initial_op), ("eval_op", eval_op),
                         ("final_op", final_op)):
            if fn is not None:
                check_callable(fn, name)
        self.model, self.data, self.num_evals = model, data, num_evals
        self.metrics = _check_metrics(metrics)
        if self.metrics and data is None:
            raise ValueError("`metrics` need `data` to be computed over; pass the batches as `data`")
        self.eval_fn, self.initial_op, self.eval_op, self.final_op = eval_fn, initial_op, eval_op, final_op
        self.variables_to_restore = _check_restore(model, variables_to_restore)
        self.hooks = _check_hooks(hooks)
        self.prefetch_depth = _prefetch_depth(prefetch, self._device())

    def targets(self) -> dict[str, torch.Tensor]:
        """The tensors to restore, looked up afresh (``model.to()`` replaces buffers)."""
        model_vars = variables.get_model_variables(self.model)
        if isinstance(self.variables_to_restore, list):
            return {n: model_vars[n] for n in self.variables_to_restore}
        return model_vars if self.variables_to_restore is None else self.variables_to_restore

    def _device(self) -> torch.device:
        return next(itertools.chain(self.model.parameters(), self.model.buffers()), torch.empty(0)).device

    def default_eval_fn(self) -> Callable[[Any], tuple[Any, Any]]:
        device = self._device()
        model = self.model

        def eval_fn(batch: Any) -> tuple[Any, Any]:
            try:
                inputs, targets = batch
            except (TypeError, ValueError):
                raise TypeError("the default `eval_fn` takes (inputs, targets) batches, got a "
                                f"{type(batch).__name__}; pass eval_fn=lambda batch: (predictions, targets)") from None
            return model(_to(inputs, device)), _to(targets, device)

        return eval_fn

    def batches(self) -> Iterator[Any]:
        data = itertools.repeat(None) if self.data is None else self.data
        if self.data is None and self.num_evals is None:
            return iter(())
        batches = iter(data) if self.num_evals is None else itertools.islice(data, self.num_evals)
        if self.prefetch_depth and self.data is not None:
            device = self._device()
            return queues.prefetch(batches, self.prefetch_depth, device=device if device.type != "cpu" else None)
        return batches


def _prefetch_depth(prefetch: Any, device: torch.device) -> int:
    """Batches drawn ahead in a background thread: by default 2 for a model on an accelerator, else none."""
    if prefetch is None:
        return 2 if device.type != "cpu" else 0
    if isinstance(prefetch, bool):
        return 2 if prefetch else 0
    if not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"`prefetch` must be True, False, a depth >= 1 or None (auto), got {prefetch!r}")
    return prefetch


def _check_metrics(metrics: Any) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) and k for k in metrics):
        raise TypeError(f"`metrics` must be a dict of name -> metric, got {metrics!r:.100}")
    out = {}
    for name, metric in metrics.items():
        if all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset")):
            out[name] = metric  # torchmetrics' metrics, or any object of this shape
        elif callable(metric):
            out[name] = _BatchMean(metric)
        else:
            raise TypeError(f"`metrics[{name!r}]` must have update/compute/reset (e.g. a torchmetrics metric) or be "
                            f"a callable fn(predictions, targets) -> number, got {type(metric).__name__}")
    return out


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


def _read_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor], int]:
    """``(checkpoint path, its model variables, its global step)``; a logdir means its latest checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"`checkpoint_path` {path!r} does not exist")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, checkpoint.STATE_FILE)):
        latest = checkpoint.latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"`checkpoint_path` {path!r} is neither a torchslim checkpoint nor a logdir holding one")
        path = latest
    step = int(checkpoint.read_metadata(path)["global_step"]) if os.path.isdir(path) else 0
    return path, variables.load_variables(path), step


@contextlib.contextmanager
def _restored(model: torch.nn.Module, targets: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor],
              source: str) -> Iterator[None]:
    """Load ``values`` into ``targets`` and eval mode; afterwards put the old weights and modes back."""
    missing = [n for n in targets if n not in values]
    wrong = [f"{n} (model {tuple(t.shape)}, checkpoint {tuple(values[n].shape)})"
             for n, t in targets.items() if n in values and values[n].shape != t.shape]
    if missing or wrong:
        raise ValueError(f"{source} does not fit the model: no value for {missing or 'none'}; shape mismatches "
                         f"{wrong or 'none'}. Pass `variables_to_restore` to choose (or rename) the variables")
    modes = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        saved = {n: t.detach().clone() for n, t in targets.items()}
        for n, t in targets.items():
            t.copy_(values[n])
    model.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in targets.items():
                t.copy_(saved[n])
        for m, training in modes:
            m.training = training


def _check_writer(summary_writer: Any) -> None:
    if summary_writer is _DEFAULT or summary_writer is None:
        return
    if not all(callable(getattr(summary_writer, m, None)) for m in ("add_scalar", "flush")):
        raise TypeError(f"`summary_writer` must have add_scalar() and flush() (a torchslim.summaries writer) or be "
                        f"None, got {type(summary_writer).__name__}")


def _open_writer(summary_writer: Any, logdir: str | os.PathLike | None) -> tuple[Any, bool]:
    """``(writer, owned)``: the default one (TensorBoard + metrics.jsonl in ``logdir``) is ours to close."""
    if summary_writer is None or (summary_writer is _DEFAULT and logdir is None):
        return summaries.NullWriter(), False
    if summary_writer is not _DEFAULT:
        return summary_writer, False
    logdir = os.fspath(logdir)
    return summaries.MultiWriter(summaries.TensorBoardWriter(logdir),
                                 summaries.JsonlWriter(os.path.join(logdir, "metrics.jsonl"))), True


def _run(ev: _Evaluation) -> tuple[dict[str, float], int]:
    """The batches through the metrics and ``eval_op``, then ``final_op``: ``(results, batches done)``."""
    metrics = list(ev.metrics.values())
    eval_fn, eval_op = ev.eval_fn or ev.default_eval_fn(), ev.eval_op
    stops = _methods(ev.hooks, "after_batch")
    if ev.initial_op is not None:
        ev.initial_op()
    n = 0
    batches = ev.batches()
    try:
        for batch in batches:  # data that runs out ends the evaluation
            if metrics:
                predictions, targets = eval_fn(batch)
                for metric in metrics:
                    metric.update(predictions, targets)
            if eval_op is not None:
                eval_op(batch)
            n += 1
            if stops and any(stop(n) for stop in stops):
                break
    finally:
        if isinstance(batches, queues.Prefetcher):
            batches.close()  # joins its thread, also when a hook stopped early
    results = {k: v for name, metric in ev.metrics.items()
               for k, v in _scalars(name, metric.compute(), f"metric {name!r}").items()}
    final = ev.final_op() if ev.final_op is not None else None
    if final is not None:
        results.update(_scalars("" if isinstance(final, Mapping) else "final_op", final, "`final_op`"))
    if ev.num_evals is not None and n < ev.num_evals and ev.data is not None and not stops:
        log.info("The data ran out after %d of num_evals=%d batches", n, ev.num_evals)
    return results, n


def _evaluate(ev: _Evaluation, path: str, values: Mapping[str, torch.Tensor], step: int,
              writer: Any) -> dict[str, float]:
    """Restore, run, put the model back; write the results at ``step`` and flush; return them."""
    started = time.monotonic()
    with _restored(ev.model, ev.targets(), values, f"checkpoint {path}"):
        for call in _methods(ev.metrics.values(), "reset") + _methods(ev.hooks, "begin"):
            call()
        try:
            with torch.inference_mode():
                results, n = _run(ev)
        finally:
            for metric in ev.metrics.values():  # their states were made in inference mode: leave none behind
                metric.reset()
    for tag, value in results.items():
        writer.add_scalar(tag, value, step)
    writer.flush()
    log.info("Evaluated %s (global step %d, %d batches, %.2f s): %s", path, step, n, time.monotonic() - started,
             ", ".join(f"{k} = {v:.4g}" for k, v in results.items()) or "no metrics")
    for end in _methods(ev.hooks, "end"):
        end(results)
    return results


def evaluate_once(checkpoint_path: str | os.PathLike, logdir: str | os.PathLike | None, model: torch.nn.Module,
                  data: Iterable[Any] | None = None, *, metrics: Mapping[str, Any] | None = None,
                  eval_fn: Callable[[Any], tuple[Any, Any]] | None = None, num_evals: int | None = None,
                  initial_op: Callable[[], Any] | None = None, eval_op: Callable[[Any], Any] | None = None,
                  final_op: Callable[[], Any] | None = None, variables_to_restore: Any = None,
                  summary_writer: Any = _DEFAULT, hooks: Iterable[Any] | None = None,
                  prefetch: bool | int | None = None) -> dict[str, float]:
    """Restore one checkpoint into ``model``, evaluate it over ``data``, write and return the metrics.

    The model runs in eval mode under ``torch.inference_mode()``; afterwards the
    weights the checkpoint overwrote and every submodule's training flag are put
    back as they were found. Per batch, the default path does no host sync.

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
    ev = _Evaluation(model, data, metrics=metrics, eval_fn=eval_fn, num_evals=num_evals, initial_op=initial_op,
                     eval_op=eval_op, final_op=final_op, variables_to_restore=variables_to_restore, hooks=hooks,
                     prefetch=prefetch)
    _check_writer(summary_writer)
    path, values, step = _read_checkpoint(checkpoint_path)
    writer, owned = _open_writer(summary_writer, logdir)
    try:
        return _evaluate(ev, path, values, step, writer)
    finally:
        if owned:
            writer.close()


# ---------------------------------------------------------------- waiting for checkpoints


def _is_newer(path: str, last: str | None) -> bool:
    """A higher global step than ``last`` (never going back, even while the newest is briefly out of view)."""
    if last is None:
        return True
    try:
        return checkpoint.step_of(path) > checkpoint.step_of(last)
    except ValueError:  # `last` is not a checkpoint name: compare paths, as the original did
        return path != last


def _poll(find: Callable[[], str | None], seconds_to_sleep: float, timeout: float | None) -> str | None:
    """Call ``find`` until it returns a path; None once another sleep would pass ``timeout`` (the original's rule)."""
    stop_time = None if timeout is None else time.monotonic() + timeout
    while True:
        path = find()
        if path is not None:
            log.info("Found new checkpoint at %s", path)
            return path
        if stop_time is not None and time.monotonic() + seconds_to_sleep > stop_time:
            return None
        time.sleep(seconds_to_sleep)


def wait_for_new_checkpoint(checkpoint_dir: str | os.PathLike, last_checkpoint: str | None = None,
                            seconds_to_sleep: float = 1, timeout: float | None = None) -> str | None:
    """Wait until a committed checkpoint newer than ``last_checkpoint`` is in ``checkpoint_dir``.

    Args:
        checkpoint_dir: the directory to watch; it need not exist yet.
        last_checkpoint: the last path seen; newer means a higher global step.
        seconds_to_sleep: how long to sleep between looks.
        timeout: give up (return None) when the next sleep would end after this many
            seconds, as the original did; None: wait forever.

    Returns:
        The newest checkpoint's path, or None on timeout.
    """
    check_positive(seconds_to_sleep, "seconds_to_sleep")
    _check_seconds(timeout, "timeout", allow_none=True)
    log.info("Waiting for a new checkpoint in %s", os.fspath(checkpoint_dir))
    return _poll(_newest_after(checkpoint_dir, last_checkpoint), seconds_to_sleep, timeout)


def _newest_after(checkpoint_dir: str | os.PathLike, last: str | None) -> Callable[[], str | None]:
    def find() -> str | None:
        path = checkpoint.latest_checkpoint(checkpoint_dir)
        return path if path is not None and _is_newer(path, last) else None

    return find


class _InOrder:
    """Finds the oldest committed checkpoint after the last one; warns about those deleted before their turn."""

    def __init__(self, checkpoint_dir: str | os.PathLike) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.last: str | None = None
        self.waiting: list[str] = []

    def __call__(self) -> str | None:
        newer = [p for p in checkpoint.list_checkpoints(self.checkpoint_dir) if _is_newer(p, self.last)]
        for gone in (p for p in self.waiting if p not in newer and _is_newer(p, self.last)):
            log.warning(_DELETED, gone)
        self.waiting = newer
        return newer[0] if newer else None


def checkpoints_iterator(checkpoint_dir: str | os.PathLike, min_interval_secs: float = 0,
                         timeout: float | None = None, timeout_fn: Callable[[], bool] | None = None,
                         every_checkpoint: bool = False) -> Iterator[str]:
    """Yield new committed checkpoints in ``checkpoint_dir`` as they appear.

    By default, as the original, each wait yields the newest checkpoint, so a slow
    consumer skips those committed meanwhile. ``every_checkpoint=True`` yields every
    committed checkpoint in order of global step, none twice; a backlog is yielded
    without waiting ``min_interval_secs``, and one deleted before its turn is
    skipped with a warning. Neither ever yields an older step than the last.

    Args:
        checkpoint_dir: the directory to watch; it need not exist (then nothing is
            yielded once ``timeout`` passes, and no error is raised).
        min_interval_secs: at least this long between the starts of two yields.
        timeout: the most seconds to wait for a new checkpoint; None: forever. The
            directory is looked at every ``min(1, timeout / 10)`` s (at least 10 ms),
            so that a short timeout is honoured rather than rounded down to whole seconds.
        timeout_fn: called once per timeout: False keeps waiting; True ends the
            iteration (after yielding what arrived since the last look). None: a
            timeout ends it.
        every_checkpoint: yield all checkpoints in order (see above).
    """
    _check_seconds(min_interval_secs, "min_interval_secs")
    _check_seconds(timeout, "timeout", allow_none=True)
    if timeout_fn is not None:
        check_callable(timeout_fn, "timeout_fn")
    if not isinstance(every_checkpoint, bool):
        raise TypeError(f"`every_checkpoint` must be True or False, got {every_checkpoint!r}")
    return _iterate(checkpoint_dir, min_interval_secs, timeout, timeout_fn, every_checkpoint)


def _iterate(checkpoint_dir: str | os.PathLike, min_interval_secs: float, timeout: float | None,
             timeout_fn: Callable[[], bool] | None, every_checkpoint: bool) -> Iterator[str]:
    sleep = 1.0 if timeout is None else max(0.01, min(1.0, timeout / 10))
    in_order = _InOrder(checkpoint_dir)
    ending = False  # timeout_fn said done: yield only what is already there, then stop
    while True:
        find = in_order if every_checkpoint else _newest_after(checkpoint_dir, in_order.last)
        path = find() if ending else _poll(find, sleep, timeout)
        if path is None:
            if ending:
                return
            if timeout_fn is None:
                log.info("Timed out waiting for a checkpoint in %s", os.fspath(checkpoint_dir))
                return
            if not timeout_fn():
                continue
            ending, path = True, find()  # one that arrived since the last look is still yielded
            if path is None:
                return
        started = time.monotonic()
        in_order.last = path
        yield path
        backlog = every_checkpoint and in_order() is not None
        if not (ending or backlog):
            time.sleep(max(0.0, started + min_interval_secs - time.monotonic()))


def _check_seconds(value: object, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a number of seconds >= 0{' or None' if allow_none else ''}, got {value!r}")


def training_finished(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether the latest checkpoint in ``checkpoint_dir`` is the final one of a run that ended normally."""
    path = checkpoint.latest_checkpoint(checkpoint_dir)
    try:
        return path is not None and bool(checkpoint.read_metadata(path).get("final", False))
    except (ValueError, OSError):  # deleted or replaced while being read: not known to be final
        return False


def stop_when_training_ends(checkpoint_dir: str | os.PathLike) -> Callable[[], bool]:
    """A ``timeout_fn`` that ends the wait once training has written its final checkpoint.

    With it, :func:`evaluation_loop` evaluates that checkpoint and returns. A
    trainer that was killed or stopped by a signal writes no final checkpoint,
    so the wait goes on; combine it with a deadline if that can happen.
    """
    return lambda: training_finished(checkpoint_dir)


# ---------------------------------------------------------------- the loop


def _read_or_skip(path: str) -> tuple[str, dict[str, torch.Tensor], int] | None:
    """Read a checkpoint the loop was given; None (with a warning) if the trainer deleted it first."""
    for attempt in range(2):
        try:
            return _read_checkpoint(path)
        except (ValueError, OSError) as e:
            if not os.path.isdir(path):
                log.warning(_DELETED, path)
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
                    summary_writer: Any = _DEFAULT, **kwargs: Any) -> dict[str, float] | None:
    """Evaluate each new checkpoint in ``checkpoint_dir`` as :func:`evaluate_once` would.

    One summary writer stays open for all the evaluations (one event file),
    flushed after each. A checkpoint the trainer deleted before it could be read
    is skipped with a warning. Safe beside a live ``learning.train`` on the same
    directory: only committed checkpoints are ever read.

    Args:
        checkpoint_dir: where the trainer commits checkpoints.
        logdir, model, data, summary_writer, **kwargs: as in :func:`evaluate_once`;
            ``data`` must be re-iterable (a DataLoader, a list), not a one-shot iterator.
        eval_interval_secs: at most one evaluation per this many seconds.
        max_number_of_evaluations: stop after this many; None: no limit.
        timeout, timeout_fn, every_checkpoint: as in :func:`checkpoints_iterator`;
            ``timeout_fn=stop_when_training_ends(checkpoint_dir)`` returns after the
            trainer's final checkpoint has been evaluated.

    Returns:
        The last evaluation's results, or None if there was none.
    """
    ev = _Evaluation.from_kwargs("evaluation_loop", model, data, kwargs)
    if isinstance(data, Iterator):
        raise ValueError(f"`data` is a one-shot iterator ({type(data).__name__}): it would be empty from the second "
                         "evaluation on; pass a re-iterable such as a DataLoader or a list")
    check_positive(max_number_of_evaluations, "max_number_of_evaluations", allow_none=True, integer=True)
    _check_seconds(eval_interval_secs, "eval_interval_secs")
    _check_writer(summary_writer)
    paths = checkpoints_iterator(checkpoint_dir, eval_interval_secs, timeout, timeout_fn, every_checkpoint)
    writer, owned, results, count = None, False, None, 0
    try:
        for path in paths:
            read = _read_or_skip(path)
            if read is None:
                continue
            if writer is None:
                writer, owned = _open_writer(summary_writer, logdir)
            results = _evaluate(ev, *read, writer)
            count += 1
            if max_number_of_evaluations is not None and count >= max_number_of_evaluations:
                break
    finally:
        paths.close()
        if owned:
            writer.close()
    return results
