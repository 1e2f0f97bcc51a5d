"""Training: build a train op from a loss and an optimizer, and run it as a supervised job.

TF-Slim's workflow, in PyTorch:

>>> import tempfile
>>> from torchslim import learning, losses
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Linear(2, 1)
>>> data = [(torch.randn(16, 2), torch.ones(16)) for _ in range(4)]
>>> def total_loss(batch):
...     inputs, labels = batch
...     losses.sigmoid_cross_entropy(model(inputs).squeeze(1), labels)
...     return losses.get_total_loss()
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> train_op = learning.create_train_op(total_loss, optimizer)
>>> logdir = tempfile.mkdtemp()
>>> final_loss = learning.train(train_op, logdir, data, number_of_steps=20)
>>> train_op.step, checkpoint.latest_checkpoint(logdir) == os.path.join(logdir, "model.ckpt-20")
(20, True)

Run the same ``train`` call again and it restores ``model.ckpt-20`` and goes on
from global step 20 (here: nothing left to do).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.utils.data.distributed
from torch.utils.hooks import RemovableHandle

from torchslim import checkpoint, distributed, gradients, summaries
from torchslim._checks import check_bool, check_callable, check_non_negative, check_positive_int
from torchslim._cpumemory import keep_freed_memory
from torchslim._logs import default_logging
from torchslim._modelstate import add_update_op, named_parameters
from torchslim._precision import make_precision
from torchslim._trainconfig import TrainConfig
from torchslim._trainop import NO_BATCH, StepResult, TrainOp
from torchslim._trainopargs import (
    _check_global_step,
    _compile_in_place,
    _device_of,
    _model_state,
    _multiply_transform,
    _resolve_update_ops,
    _variables_to_train,
)
from torchslim._types import DEFAULT, GlobalStep, GradientTransform, NonFiniteError
from torchslim.supervisor import Supervisor
from torchslim.validation import Validation, Watch

__all__ = [
    "GlobalStep",
    "add_gradients_summaries",
    "NonFiniteError",
    "StepResult",
    "TrainOp",
    "clip_gradient_norms",
    "clip_gradient_norms_fn",
    "create_train_op",
    "multiply_gradients",
    "register_update_op",
    "train",
    "train_step",
]

log = logging.getLogger("torchslim")

add_gradients_summaries = summaries.add_gradients_summaries
clip_gradient_norms = gradients.clip_gradient_norms
clip_gradient_norms_fn = gradients.clip_gradient_norms_fn
multiply_gradients = gradients.multiply_gradients


_DEFAULT: Any = DEFAULT


def register_update_op(model: torch.nn.Module, op: Callable[[], Any]) -> RemovableHandle:
    """Register ``op`` (called with no argument after each optimizer step) as an update op of ``model``.

    Train ops built later for ``model`` with ``update_ops=None`` run it, e.g. an
    exponential moving average of the weights::

        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
        register_update_op(model, lambda: ema.update_parameters(model))

    BatchNorm's running statistics need nothing: PyTorch updates them in the
    forward pass. The op is kept on the model, as its forward hooks are. Returns
    a handle whose ``remove()`` unregisters the op.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    check_callable(op, "op")
    return add_update_op(model, op)


def create_train_op(
    total_loss: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    global_step: GlobalStep | None = _DEFAULT,
    update_ops: Iterable[Callable[[], Any]] | None = None,
    variables_to_train: Iterable[str | torch.Tensor] | None = None,
    clip_gradient_norm: float = 0,
    summarize_gradients: bool = False,
    gradient_multipliers: Mapping[str | torch.Tensor, float] | None = None,
    check_numerics: bool = True,
    transform_grads_fn: GradientTransform | None = None,
    *,
    model: torch.nn.Module | Mapping[str, torch.nn.Module] | None = None,
    lr_scheduler: Any = None,
    lr_scheduler_interval: str = "step",
    precision: str = "fp32",
    accumulate_steps: int = 1,
    compile: bool = False,  # noqa: A002 - the name PyTorch users know (torch.compile, Lightning, Accelerate)
) -> TrainOp:
    """Make the op that, each time it is called, computes the loss and applies one gradient step.

    Args:
        total_loss: a callable returning a scalar loss tensor; it takes the batch,
            or nothing when it reads its own data. Losses made with
            :mod:`torchslim.losses` inside it are collected for that call only.
        optimizer: a ``torch.optim`` optimizer over the model's parameters.
        global_step: the step counter to increment. Default: a new
            :class:`GlobalStep` (pass one to share it between ops); ``None``: no counting.
        update_ops: callables run after each optimizer step. ``None``: those
            registered with :func:`register_update_op` for the model; ``[]``: none.
        variables_to_train: parameters, or their names, to train; the others are
            frozen for this op. Default: every parameter in ``optimizer``.
        clip_gradient_norm: if > 0, clip each gradient tensor to this L2 norm
            (per tensor; for a global norm use ``gradients.clip_by_global_norm``).
        summarize_gradients: when summaries are written, add a histogram
            ``<param>/gradient`` and a scalar ``<param>/gradient_norm`` per parameter.
        gradient_multipliers: parameter (or name) -> factor for its gradient.
        check_numerics: raise :class:`NonFiniteError` when the loss is NaN/Inf,
            naming the step and the first parameter with a non-finite gradient or
            value. Per step on the CPU; on an accelerator at log/save points, so
            that no step waits for the device.
        transform_grads_fn: a function over the list of ``(grad, param)`` pairs,
            applied after the multipliers and the clipping.
        model: the module, or a dict of name -> module or tensor, whose state the op
            owns and checkpoints (include an EMA copy here to have it saved). Default:
            found from what ``total_loss`` refers to (its closure, the globals it
            names, ``self``, a partial's arguments).
        lr_scheduler: a ``torch.optim.lr_scheduler``, checkpointed with the run.
        lr_scheduler_interval: when ``lr_scheduler.step()`` runs: ``"step"`` (the
            default, TF-Slim's meaning of a decay: after every optimizer update) or
            ``"epoch"`` (when :func:`train` starts an epoch of the data after the
            first, as ``for epoch ...: train(); scheduler.step()`` does, for
            schedulers written in epochs such as ``StepLR(step_size=30)``).
        precision: ``"fp32"`` (the default: as written), ``"bf16"`` (the loss function
            runs under ``torch.autocast`` on the model's device type with bfloat16) or
            ``"fp16"`` (autocast with float16 and a ``torch.amp.GradScaler``, whose
            state is checkpointed). Gradients are unscaled before the multipliers, the
            clipping, ``transform_grads_fn`` and gradient summaries see them. An fp16
            update the scaler skips (Inf/NaN gradients) steps neither the optimizer,
            the LR scheduler nor the global step; it is logged and counted
            (``skipped_updates`` in the summaries, with ``loss_scale``).
        accumulate_steps: batches per optimizer update (gradient accumulation). Each
            batch's loss is divided by it, so k batches of b samples make the update
            one batch of k*b would (for a loss that is a mean over the batch). The
            global step counts updates; epochs and the data position count batches;
            logs and summaries report the update's mean loss.
        compile: compile each module the op owns in place (as ``module.compile(fullgraph=True)``:
            ``torch.compile`` of its forward, and of its backward through AOTAutograd;
            checkpoint names stay the module's own). The first step compiles and its
            time is logged once; a model torch.compile cannot capture whole raises
            ``ValueError`` with the compiler's message at that step (no eager
            fallback). It pays on larger models and accelerators; on the CPU a tiny
            model gets slower (see the README's "Speed" section). A last batch of
            another size makes one more compilation: ``drop_last=True`` avoids it.

    Returns:
        A :class:`TrainOp`; ``train_op(batch)`` performs one step and returns the loss.
    """
    check_callable(total_loss, "total_loss")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    state = _model_state(total_loss, optimizer, model)
    op_names = dict(named_parameters(state))
    trained = _variables_to_train(variables_to_train, optimizer, op_names)
    check_non_negative(clip_gradient_norm, "clip_gradient_norm")
    if transform_grads_fn is not None:
        check_callable(transform_grads_fn, "transform_grads_fn")
    check_bool(check_numerics, "check_numerics")
    check_bool(summarize_gradients, "summarize_gradients")
    if lr_scheduler is not None and not (callable(getattr(lr_scheduler, "step", None))
                                         and callable(getattr(lr_scheduler, "state_dict", None))):
        raise TypeError(f"`lr_scheduler` must have step() and state_dict(), got {type(lr_scheduler).__name__}")
    if lr_scheduler_interval not in ("step", "epoch"):
        raise ValueError(f"`lr_scheduler_interval` must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
    check_positive_int(accumulate_steps, "accumulate_steps")
    numerics = make_precision(precision, _device_of(state))
    check_bool(compile, "compile")
    if compile:
        for module in (m for m in state.values() if isinstance(m, torch.nn.Module)):
            _compile_in_place(module)
    multiply = None
    if gradient_multipliers is not None:
        multiply = _multiply_transform(gradient_multipliers, op_names, trained, optimizer)
    transform = gradients.chain(
        multiply,
        gradients.clip_gradient_norms_fn(clip_gradient_norm) if clip_gradient_norm > 0 else None,
        transform_grads_fn,
    )
    modules = [m for m in state.values() if isinstance(m, torch.nn.Module)]
    return TrainOp(
        total_loss, optimizer, state=state,
        global_step=GlobalStep() if global_step is _DEFAULT else _check_global_step(global_step),
        update_ops=_resolve_update_ops(update_ops, modules),
        params_to_train=trained, transform=transform, check_numerics=check_numerics, lr_scheduler=lr_scheduler,
        lr_scheduler_interval=lr_scheduler_interval,
        summarize_gradients=summarize_gradients, precision=numerics, accumulate_steps=accumulate_steps,
        compiled=compile,
    )


def train_step(train_op: TrainOp, batch: Any, train_step_kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, bool]:
    """Run one step; return ``(loss, should_stop)``. The default ``train_step_fn`` of :func:`train`.

    Logs ``global step N: loss = X (T sec/step)`` every ``log_every_n_steps``
    steps (``None``: never) and stops at ``number_of_steps`` (both from
    ``train_step_kwargs``). ``batch=None`` calls ``train_op()`` (its loss
    function reads its own data).
    """
    result, should_stop = _run_step(train_op, batch, train_step_kwargs)
    return result.loss, should_stop


def _run_step(train_op: TrainOp, batch: Any, train_step_kwargs: Mapping[str, Any]) -> tuple[StepResult, bool]:
    """:func:`train_step`, returning the whole :class:`StepResult` (the loop's summaries use its named losses)."""
    started = time.perf_counter()
    result = train_op.run(NO_BATCH if batch is None else batch)
    if not result.applied:
        return result, False
    step, every = train_op.step, train_step_kwargs["log_every_n_steps"]
    if every and step % every == 0 and log.isEnabledFor(logging.INFO):
        value = result.loss.item()  # host sync: on logging steps only
        log.info("global step %d: loss = %.4f (%.3f sec/step)", step, value, time.perf_counter() - started)
    target = train_step_kwargs["number_of_steps"]
    return result, target is not None and step >= target


def _with_step_result(train_step_fn: Callable[..., tuple[Any, bool]]) -> Callable[..., tuple[StepResult, bool]]:
    """A user's ``train_step_fn`` whose loss is made a :class:`StepResult` for the loop (it may return one)."""
    def step(train_op: TrainOp, batch: Any, kwargs: Mapping[str, Any]) -> tuple[StepResult, bool]:
        loss, should_stop = train_step_fn(train_op, batch, kwargs)
        return (loss if isinstance(loss, StepResult) else StepResult(loss)), should_stop

    return step


def train(
    train_op: TrainOp,
    logdir: str | os.PathLike | None,
    data: Iterable[Any] | None = None,
    *,
    train_step_fn: Callable[[TrainOp, Any, Mapping[str, Any]], tuple[torch.Tensor, bool]] = train_step,
    train_step_kwargs: Mapping[str, Any] | None = None,
    log_every_n_steps: int = 1,
    number_of_steps: int | None = None,
    init_fn: Callable[..., Any] | None = None,
    summary_op: Callable[[TrainOp], Mapping[str, float]] | None = _DEFAULT,
    save_summaries_secs: float | None = 600,
    save_summaries_steps: int | None = None,
    summary_writer: Any = _DEFAULT,
    saver: checkpoint.Saver | None = None,
    save_interval_secs: float | None = 600,
    save_interval_steps: int | None = None,
    trace_every_n_steps: int | None = None,
    prefetch: bool | int | None = None,
    progress_bar: bool | None = None,
    master: str | None = None,
    is_chief: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    sync_optimizer: bool | None = None,
    startup_delay_steps: int = 0,
    validation: Validation | None = None,
    watch: Watch | None = None,
    sharding: str | None = None,
) -> float | None:
    """Run ``train_op`` as a supervised job: restore or init, step, summarize, checkpoint, stop, save.

    Args:
        train_op: from :func:`create_train_op`.
        logdir: where checkpoints, event files and ``metrics.jsonl`` go. If it holds
            a checkpoint, training resumes from the newest readable one (a corrupt
            newest one is reported and skipped). ``None``: nothing is written (then
            ``saver``, ``save_interval_steps``, ``summary_op``, ``summary_writer`` and
            ``trace_every_n_steps`` are errors).
        data: any iterable of batches, re-iterated each epoch; each batch is passed
            to the loss function. ``None``: the loss function reads its own data.
        train_step_fn: ``(train_op, batch, train_step_kwargs) -> (loss, should_stop)``,
            called once per batch. Its ``loss`` may be the :class:`StepResult` of
            ``train_op.run(batch)``, whose named losses then go into the summaries.
        train_step_kwargs: extra entries for ``train_step_fn``, merged over the
            defaults (``number_of_steps``, ``log_every_n_steps``, ``logdir``).
        log_every_n_steps: how often the default step logs its line (through ``logging``, at INFO).
        number_of_steps: the global step to stop at (absolute: a resumed run only
            does what is left). ``None``: until the data runs out or a stop signal.
        init_fn: called on a fresh start only (not on resume), with the train op if
            it takes an argument; e.g. :func:`torchslim.variables.assign_from_checkpoint_fn`.
        summary_op: ``summary_op(train_op) -> {tag: number}``, extra scalars written
            with the summaries; ``None``: no summaries at all.
        save_summaries_secs: write summaries every this many seconds (``None``: not by time).
        save_summaries_steps: write summaries every this many global steps.
        summary_writer: where summaries go. Default: TensorBoard event files and
            ``metrics.jsonl`` in ``logdir``; ``None``: nowhere; or a
            :class:`torchslim.summaries.SummaryWriter`.
        saver: a :class:`torchslim.checkpoint.Saver` (default: keep the newest 5).
        save_interval_secs: save every this many seconds (``None``: not by time).
        save_interval_steps: save every this many global steps (``None``: not by steps).
        trace_every_n_steps: write a Chrome trace of every n-th step to ``logdir/trace-<step>.json``.
        prefetch: draw batches in a background thread, this many ahead (``True``: 2),
            moving them to the model's device. Default: on when the model is on an
            accelerator, where it overlaps loading and copies with the step; off on
            the CPU, where a ``DataLoader``'s workers already load in the background
            and the loop's global RNG stays on one thread (exact resume, see README).
        progress_bar: show one (steps, loss, steps/s, ETA). Default: when stderr is a terminal.
        master: the address of the process group (``"tcp://10.0.0.1:29500"``), with
            ``rank`` and ``world_size``; not needed under ``torchrun``, whose
            environment says all three. See :mod:`torchslim.distributed`.
        is_chief: whether this process checkpoints and summarizes (default: rank 0).
        rank: this process's rank (default: ``$RANK``, or 0).
        world_size: the number of processes (default: ``$WORLD_SIZE``, or 1).
        sync_optimizer: ``None``/``True``: synchronous updates (gradients averaged
            every step). ``False``: asynchronous updates, as the original without a
            sync optimizer: ``world_size`` processes forked on this machine update
            the shared parameters without waiting for each other (CPU only).
        startup_delay_steps: asynchronous mode only: non-chief workers wait until
            the global step reaches this before they start.
        validation: a :class:`torchslim.validation.Validation`: evaluate held-out data
            on a schedule, in this process, into ``<logdir>/eval`` (see :mod:`torchslim.validation`).
        watch: a :class:`torchslim.validation.Watch`: a metric of the validation (or, without
            one, of the records of an evaluator in another process) by which the best
            checkpoints are kept and the run stops early.
        sharding: ``None``: every process holds the whole model, gradients are
            averaged by DDP. ``"fsdp"`` (several processes only): FSDP2 shards the
            parameters, gradients and optimizer state of each child module with
            parameters (each block of a ``ModuleList``), then the root, so each
            process holds about 1/world_size, and each process writes its own
            shards of every checkpoint (the logdir must be one directory every
            process sees); a checkpoint resumes on any number of processes. See
            :mod:`torchslim._fsdp`.

    Returns:
        The last loss as a float, or ``None`` if no step was taken.

    A final checkpoint and summary are written when the target is reached, the
    data runs out, the watched metric stops improving, or on SIGTERM / Ctrl-C
    (which are then re-raised); never after an error.

    While a model on the CPU trains, glibc's allocator keeps freed memory in the
    process instead of returning it to the system after every step (a page-fault
    storm otherwise, worst with bf16): process-wide, set back when ``train``
    returns; ``TORCHSLIM_KEEP_FREED_MEMORY=0`` in the environment turns it off
    (see the README's "Speed" section).
    """
    config = TrainConfig(
        train_op=train_op, logdir=logdir, data=data, train_step_fn=train_step_fn,
        train_step_kwargs=train_step_kwargs, log_every_n_steps=log_every_n_steps, number_of_steps=number_of_steps,
        init_fn=init_fn, summary_op=summary_op, save_summaries_secs=save_summaries_secs,
        save_summaries_steps=save_summaries_steps, summary_writer=summary_writer, saver=saver,
        save_interval_secs=save_interval_secs, save_interval_steps=save_interval_steps,
        trace_every_n_steps=trace_every_n_steps, prefetch=prefetch, progress_bar=progress_bar, master=master,
        is_chief=is_chief, rank=rank, world_size=world_size, sync_optimizer=sync_optimizer,
        startup_delay_steps=startup_delay_steps, validation=validation, watch=watch,
        sharding=sharding,
    )
    step_fn = _run_step if train_step_fn is train_step else _with_step_result(train_step_fn)
    kwargs = config.step_kwargs()
    result = None
    with default_logging(), keep_freed_memory(config.device is None), Supervisor(config) as sv, \
            distributed.naming_the_rank(config.cluster):
        sv.restore_or_initialize()
        with sv.workers(step_fn, kwargs):
            for batch in sv.batches():
                sv.before_step()
                result, should_stop = step_fn(train_op, batch, kwargs)
                if sv.after_step(result) or should_stop:
                    break
        sv.finish(result)
    return None if result is None else float(result.loss)
