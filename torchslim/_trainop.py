"""The train op: one training step as a callable object, composed of named phases.

Kept apart from ``learning`` so that the step, the thing that runs millions of
times, can be read on its own. ``learning.create_train_op`` builds it.

The phases, in the order they run (:meth:`TrainOp.run`)::

    forward_backward(batch)   every batch: the loss under the precision's autocast,
                              checked for NaN/Inf, back-propagated (scaled by 1/k)
    apply()                   once per k batches (k = accumulate_steps):
                                synchronize gradients across processes
                                unscale them (loss scaling), transform them
                                (multiply, clip, the user's function)
                                step the optimizer, then the LR scheduler
                                run the update ops, count the global step
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

from torchslim import losses, summaries
from torchslim._checks import check_fits, check_optimizer_fits
from torchslim._modelstate import ModelState, model_variables, named_parameters
from torchslim._precision import Precision
from torchslim._types import GlobalStep, GradientSync, GradientTransform, LocalGradients, NonFiniteError

log = logging.getLogger("torchslim")

NO_BATCH: Any = object()  # the loss function takes no argument: it reads its own data


class StepResult(NamedTuple):
    """What one call of :meth:`TrainOp.run` produced.

    Attributes:
        loss: the loss, detached (no host sync). When the call ended an update of
            several micro-batches, the mean loss of the update.
        losses: the losses the loss function recorded in this call
            (``losses.named()`` gives ``(tag, tensor)`` pairs for summaries).
        applied: whether the call ended an update: the optimizer stepped and the
            global step moved. False on the inner micro-batches of an accumulation,
            and when the fp16 loss scaler skipped the update (Inf/NaN gradients).
    """

    loss: torch.Tensor
    losses: losses.LossCollection | None = None
    applied: bool = True  # a NamedTuple, not a dataclass: made every step, it must cost nothing


class TrainOp:
    """One optimization step, as TF-Slim's train op: compute the loss, the gradients, apply them.

    Calling it (``train_op(batch)``) runs :meth:`run` and returns the detached
    loss tensor (no host sync on an accelerator). Build it with
    :func:`torchslim.learning.create_train_op`.

    Its ``state_dict()`` holds everything a resume needs: the model's variables,
    the optimizer, the LR scheduler and the global step.
    """

    def __init__(self, total_loss: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 state: ModelState, global_step: GlobalStep | None,
                 update_ops: list[Callable[[], Any]], params_to_train: list[torch.Tensor] | None,
                 transform: GradientTransform | None, check_numerics: bool, lr_scheduler: Any = None,
                 lr_scheduler_interval: str = "step",
                 summarize_gradients: bool = False, precision: Precision | None = None,
                 accumulate_steps: int = 1, compiled: bool = False) -> None:
        self.total_loss = total_loss
        self.optimizer = optimizer
        self.global_step = global_step
        self.update_ops = update_ops
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval  # "epoch": the train loop steps it at epoch starts
        self.check_numerics = check_numerics
        self.transform = transform
        self.summarize_gradients = summarize_gradients
        self.precision = precision if precision is not None else Precision()
        self.accumulate_steps = accumulate_steps
        self._state = dict(state)
        self._all_params = [p for g in optimizer.param_groups for p in g["params"]]
        self._trained = params_to_train if params_to_train is not None else [p for p in self._all_params if p.requires_grad]
        self._backward_inputs = params_to_train  # None: plain backward(), as a hand-written loop does
        self._sync: GradientSync = LocalGradients()
        self._micro_batches = 0  # taken in the current update
        self._update_loss: torch.Tensor | None = None  # their summed loss, when accumulating
        self._update_losses: losses.LossCollection | None = None  # each named loss's mean, on summary steps
        self._sync_numerics: bool | None = None  # decided on the first step, from the loss's device
        self._pending_finite: torch.Tensor | None = None
        self._pending_since = 0
        self._compiling = compiled  # the first step compiles: timed, and its compiler errors made ValueErrors

    # ------------------------------------------------------------ the step

    def __call__(self, batch: Any = NO_BATCH) -> torch.Tensor:
        return self.run(batch).loss

    def run(self, batch: Any = NO_BATCH) -> StepResult:
        """One batch through :meth:`forward_backward`; the :meth:`apply` phase when it completes an update."""
        loss, collected = self.forward_backward(batch)
        if self._micro_batches < self.accumulate_steps:
            return StepResult(loss, collected, applied=False)
        if self._update_loss is not None:
            loss, self._update_loss = self._update_loss / self.accumulate_steps, None
        if self._update_losses is not None:  # summaries show each loss over the whole update, as the total
            collected, self._update_losses = self._update_losses, None
        return StepResult(loss, collected, applied=self.apply())

    def forward_backward(self, batch: Any = NO_BATCH) -> tuple[torch.Tensor, losses.LossCollection]:
        """Compute one micro-batch's loss and add its gradients; return the detached loss and the losses recorded."""
        if self._micro_batches + 1 < self.accumulate_steps:
            with self._sync.no_sync():  # an inner micro-batch: nothing to communicate (DDP: forward included)
                return self._forward_backward(batch)
        return self._forward_backward(batch)

    def _forward_backward(self, batch: Any) -> tuple[torch.Tensor, losses.LossCollection]:
        if self._compiling:
            self._compiling = False
            return self._compile_step(batch)
        with losses.collect_losses() as collected, self.precision.autocast():
            loss = self.total_loss() if batch is NO_BATCH else self.total_loss(batch)
        if self._sync_numerics is None:
            self._first_step_checks(loss)
        if self.check_numerics:
            self._check_loss(loss, collected)
        first = self._micro_batches == 0
        if first:  # after the check: a NaN message names the previous step's gradients
            for p in self._all_params:
                p.grad = None
        self._micro_batches += 1
        k = self.accumulate_steps
        self._backward(self.precision.scale(loss if k == 1 else loss / k))
        loss = loss.detach()
        if k > 1:
            self._update_loss = loss if first or self._update_loss is None else self._update_loss + loss
            if summaries.recording():  # only where summaries will read them: a few scalar ops per micro-batch
                self._update_losses = _add_mean(None if first else self._update_losses, collected, k)
        return loss, collected

    def _compile_step(self, batch: Any) -> tuple[torch.Tensor, losses.LossCollection]:
        """The first step of compiled modules: compiles their forward and backward passes, timed, logged once."""
        import torch._dynamo.exc as dynamo

        started = time.perf_counter()
        try:
            result = self._forward_backward(batch)
        except (dynamo.Unsupported, dynamo.BackendCompilerFailed, dynamo.InternalTorchDynamoError,
                dynamo.UserError) as e:
            message = str(e).strip().split("\n\n")[0]
            raise ValueError(f"`compile`=True: torch.compile(fullgraph=True) cannot compile the model "
                             f"({', '.join(k or '<the model>' for k in self.modules)}): {message}. "
                             "Pass compile=False to train it eagerly, or change what it does there") from e
        log.info("compile: the first step took %.1f s (compiling the forward and backward passes)",
                 time.perf_counter() - started)
        return result

    def apply(self) -> bool:
        """Apply the accumulated gradients: the update's phases. Returns whether the optimizer stepped."""
        self._micro_batches = 0
        self._sync.synchronize()
        self.precision.unscale_(self.optimizer)
        self._transform_gradients()
        if not self.precision.step(self.optimizer):
            log.info("global step %d: the fp16 loss scaler skipped this update (Inf/NaN gradients) and lowered the "
                     "scale; %d update(s) skipped so far", self.step, self.precision.skipped_updates)
            return False
        if self.lr_scheduler is not None and self.lr_scheduler_interval == "step":
            self.lr_scheduler.step()
        for op in self.update_ops:
            op()
        if self.global_step is not None:
            self.global_step.increment()
        return True

    def _backward(self, loss: torch.Tensor) -> None:
        if self._backward_inputs is None:
            loss.backward()
        else:
            loss.backward(inputs=self._backward_inputs)

    def _transform_gradients(self) -> None:
        if self.transform is not None:
            for grad, param in self.transform([(p.grad, p) for p in self._trained]):
                param.grad = grad
        if self.summarize_gradients and summaries.recording():  # the gradients as applied, on summary steps
            summaries.add_gradients_summaries(self.grads_and_vars())

    @contextlib.contextmanager
    def synchronized(self, sync: GradientSync) -> Iterator[TrainOp]:
        """Combine the gradients of every update with ``sync`` inside the block (a run over several processes)."""
        previous, self._sync = self._sync, sync
        try:
            yield self
        finally:
            self._sync = previous

    # ------------------------------------------------------------ numerics

    def _first_step_checks(self, loss: object) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
            raise TypeError(f"the loss function must return a scalar tensor, got {what}")
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on any parameter that requires a gradient; "
                             "check that the loss function uses the model (and not under torch.no_grad())")
        # On the CPU reading the loss costs nothing; on an accelerator it would stall
        # the pipeline, so there the check is deferred to the next log/save point.
        self._sync_numerics = loss.device.type == "cpu"

    def _check_loss(self, loss: torch.Tensor, collected: losses.LossCollection) -> None:
        if self._sync_numerics:
            if not math.isfinite(loss.item()):  # host sync, free on the CPU
                bad = [f"{tag} = {t.item()}" for tag, t in collected.named() if not bool(torch.isfinite(t).all())]
                raise self._nonfinite_error(f"the loss is {loss.item()}" + (f" ({', '.join(bad)})" if bad else ""))
            return
        finite = torch.isfinite(loss.detach())
        if self._pending_finite is None:
            self._pending_finite, self._pending_since = finite, self.step
        else:
            self._pending_finite = self._pending_finite & finite

    def flush_numerics_check(self) -> None:
        """Raise if a deferred check saw a NaN/Inf loss (one host sync). The train loop calls this before saving."""
        pending, self._pending_finite = self._pending_finite, None
        if pending is not None and not bool(pending):  # host sync, on log/save steps only
            raise self._nonfinite_error(
                f"the loss was NaN or Inf at some global step in [{self._pending_since}, {self.step}]")

    def _nonfinite_error(self, what: str) -> NonFiniteError:
        names = {id(p): n for n, p in self.named_parameters()}
        culprit = "no parameter holds NaN/Inf yet"
        for p in self._all_params:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                culprit = (f"the first parameter with a non-finite gradient (from step {self.step - 1}) "
                           f"is {names.get(id(p), '?')!r}")
                break
            if not bool(torch.isfinite(p.detach()).all()):
                culprit = f"the first parameter holding NaN/Inf is {names.get(id(p), '?')!r}"
                break
        return NonFiniteError(f"check_numerics: at global step {self.step}, {what}; {culprit}")

    # ------------------------------------------------------------ state

    @property
    def step(self) -> int:
        """The global step (0 when this op does not count steps)."""
        return self.global_step.value if self.global_step is not None else 0

    @property
    def update_in_progress(self) -> bool:
        """Whether micro-batches of the current update were taken and the update is not yet applied."""
        return self._micro_batches > 0

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose state this op owns, by name ('' for a single model)."""
        return {k: v for k, v in self._state.items() if isinstance(v, torch.nn.Module)}

    @property
    def model(self) -> torch.nn.Module:
        """The model, when the op owns exactly one module."""
        modules = self.modules
        if len(modules) != 1:
            raise AttributeError(f"this train op owns {len(modules)} modules ({', '.join(modules)}); use .modules")
        return next(iter(modules.values()))

    @property
    def trained_parameters(self) -> list[torch.Tensor]:
        """The parameters this op updates."""
        return list(self._trained)

    def replace_parameters(self, new: Mapping[int, torch.Tensor]) -> None:
        """Point the op and its optimizer at new parameter objects (``id(old) -> new``), their state moved along.

        For an engine that re-creates the parameters it shards (FSDP).
        """
        for group in self.optimizer.param_groups:
            group["params"] = [new.get(id(p), p) for p in group["params"]]
        state = self.optimizer.state
        for old in [p for p in state if id(p) in new]:
            state[new[id(old)]] = state.pop(old)
        self._all_params = [new.get(id(p), p) for p in self._all_params]
        self._trained = [new.get(id(p), p) for p in self._trained]
        if self._backward_inputs is not None:
            self._backward_inputs = [new.get(id(p), p) for p in self._backward_inputs]

    def grads_and_vars(self) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """The ``(gradient, parameter)`` pairs of the last step, for the parameters this op trains."""
        return [(p.grad, p) for p in self._trained]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Every trainable tensor this op owns, by its variable name."""
        return named_parameters(self._state)

    def model_variables(self) -> dict[str, torch.Tensor]:
        """Every variable (parameters and persistent buffers) this op owns, by name, as live tensors."""
        return model_variables(self._state)

    def state_dict(self) -> dict[str, Any]:
        """Model variables, optimizer, LR scheduler, loss scaler and global step, for a checkpoint."""
        state: dict[str, Any] = {
            "model": {k: v.detach() for k, v in self.model_variables().items()},
            "optimizer": self.optimizer.state_dict(),
            "optimizer_class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}",
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if precision := self.precision.state_dict():
            state["precision"] = precision
        if self.global_step is not None:
            state["global_step"] = self.global_step.value
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a model that does not fit raises ``ValueError``."""
        variables = self.model_variables()
        saved = state["model"]
        check_fits(variables, saved, "the checkpoint", unexpected=sorted(set(saved) - set(variables)))
        differ = check_optimizer_fits(self.optimizer, state["optimizer"], state.get("optimizer_class"), "the checkpoint")
        if differ:
            log.warning("The checkpoint's optimizer hyperparameters differ from this run's; the checkpoint's are "
                        "restored, as torch.optim's load_state_dict does: %s. To train with other values, start a "
                        "new logdir warm-started from this one (init_fn=variables.assign_from_checkpoint_fn(...))",
                        "; ".join(differ))
        with torch.no_grad():
            for k, t in variables.items():
                t.copy_(saved[k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.precision.load_state_dict(state.get("precision", {}))
        if self.global_step is not None and "global_step" in state:
            self.global_step.value = int(state["global_step"])

    def __repr__(self) -> str:
        return (f"TrainOp(modules={list(self.modules) or None}, optimizer={type(self.optimizer).__name__}, "
                f"step={self.step}, update_ops={len(self.update_ops)}, check_numerics={self.check_numerics})")


def _add_mean(total: losses.LossCollection | None, collected: losses.LossCollection, k: int) -> losses.LossCollection:
    """``total`` plus ``collected / k``, loss by loss (detached), keeping names: the mean over k micro-batches.

    A micro-batch that adds other losses than the first did starts the sum afresh.
    """
    out = losses.LossCollection()
    for kind in ("losses", "regularization_losses"):
        before, now = getattr(total, kind) if total is not None else None, getattr(collected, kind)
        same = before is not None and len(before) == len(now)
        for i, loss in enumerate(now):
            value = loss.detach() / k
            if same:
                value = before[i] + value  # type: ignore[index]
            getattr(out, kind).append(value)
            out.names[id(value)] = collected.names.get(id(loss), "loss")
    return out
