"""The train op: one training step as a callable object (``batch -> loss``).

Kept apart from ``learning`` so that the step, the thing that runs millions of
times, can be read on its own. ``learning.create_train_op`` builds it.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from torchslim import losses
from torchslim._types import GlobalStep, GradientTransform, NonFiniteError
from torchslim.variables import canonical_name

NO_BATCH: Any = object()  # the loss function takes no argument: it reads its own data

# Update ops registered per model, like PyTorch's per-module hooks. Weak keys: a
# model that is garbage-collected takes its update ops with it.
_UPDATE_OPS: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Callable[[], Any]]] = weakref.WeakKeyDictionary()


class UpdateOpHandle:
    """Returned by :func:`register_update_op`; ``remove()`` unregisters the op."""

    _next_id = 0

    def __init__(self, model: torch.nn.Module, op: Callable[[], Any]) -> None:
        UpdateOpHandle._next_id += 1
        self.id = UpdateOpHandle._next_id
        self._model = weakref.ref(model)
        _UPDATE_OPS.setdefault(model, {})[self.id] = op

    def remove(self) -> None:
        model = self._model()
        if model is not None:
            _UPDATE_OPS.get(model, {}).pop(self.id, None)


def registered_update_ops(modules: Iterable[torch.nn.Module]) -> list[Callable[[], Any]]:
    """The update ops registered on ``modules`` or any of their submodules, in registration order."""
    found: dict[int, Callable[[], Any]] = {}
    for module in modules:
        for sub in module.modules():
            found.update(_UPDATE_OPS.get(sub, {}))
    return [found[k] for k in sorted(found)]


def find_model_state(total_loss: Callable[..., Any]) -> dict[str, torch.nn.Module | torch.Tensor]:
    """The modules and loose trainable tensors that ``total_loss`` refers to, by variable name.

    Looks at what the function closes over and the globals it names (one level
    into plain objects, for ``self.model``), at a bound method's ``self``, at a
    ``functools.partial``'s arguments, and at the callable itself if it is a module.
    Submodules of a found module are dropped.
    """
    found: dict[str, Any] = {}

    def consider(name: str, value: Any, depth: int = 0) -> None:
        if isinstance(value, torch.nn.Module) or (isinstance(value, torch.Tensor) and value.requires_grad):
            found.setdefault(name, value)
        elif depth == 0 and hasattr(value, "__dict__") and not inspect.ismodule(value) and not callable(value):
            for attr, v in vars(value).items():
                consider(attr, v, 1)

    fn = total_loss
    if isinstance(fn, torch.nn.Module):
        return {"": fn}
    if inspect.ismethod(fn):
        consider("self", fn.__self__)
        if isinstance(fn.__self__, torch.nn.Module):
            return {"": fn.__self__}
        fn = fn.__func__
    for i, arg in enumerate(getattr(fn, "args", ())):  # functools.partial
        consider(f"arg{i}", arg)
    for k, v in (getattr(fn, "keywords", None) or {}).items():
        consider(k, v)
    fn = getattr(fn, "func", fn)
    if inspect.isfunction(fn):
        for k, v in _referenced_names(fn).items():
            consider(k, v)
    modules = [m for m in found.values() if isinstance(m, torch.nn.Module)]
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    params_of_modules = {id(p) for m in modules for p in m.parameters()}
    return {k: v for k, v in found.items()
            if id(v) not in inner and not (isinstance(v, torch.Tensor) and id(v) in params_of_modules)}


def _referenced_names(fn: Any) -> dict[str, Any]:
    """Closure variables (skipping cells not yet filled) and the globals named in ``fn``'s code."""
    code = fn.__code__
    found = {}
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            found[name] = cell.cell_contents
        except ValueError:  # a cell assigned after the function was made, e.g. `op = create_train_op(f)`
            continue
    codes = [code]
    while codes:
        c = codes.pop()
        codes += [k for k in c.co_consts if inspect.iscode(k)]
        for name in c.co_names:
            if name in fn.__globals__:
                found.setdefault(name, fn.__globals__[name])
    return found


def _prefixed(state: Mapping[str, Any], name: str, key: str) -> str:
    # One model: plain state_dict names. Several: prefixed by the variable that holds each.
    return key if len(state) == 1 or not name else f"{name}.{key}"


def named_parameters(state: Mapping[str, torch.nn.Module | torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The trainable tensors of a train op's state (modules and loose tensors), by variable name."""
    out = []
    for name, holder in state.items():
        if isinstance(holder, torch.nn.Module):
            out += [(_prefixed(state, name, canonical_name(k)), p) for k, p in holder.named_parameters()]
        else:
            out.append((name, holder))
    return out


class TrainOp:
    """One optimization step, as TF-Slim's train op: compute the loss, the gradients, apply them.

    Calling it (``train_op(batch)``) runs the loss function inside a fresh loss
    collection, checks the loss for NaN/Inf, back-propagates into the trained
    parameters only, applies the gradient transform, steps the optimizer and the
    LR scheduler, runs the update ops, counts the global step, and returns the
    detached loss tensor (no host sync on an accelerator). Build it with
    :func:`torchslim.learning.create_train_op`.

    Its ``state_dict()`` holds everything a resume needs: the model's variables,
    the optimizer, the LR scheduler and the global step.
    """

    def __init__(self, total_loss: Callable[..., torch.Tensor], optimizer: torch.optim.Optimizer, *,
                 state: Mapping[str, torch.nn.Module | torch.Tensor], global_step: GlobalStep | None,
                 update_ops: list[Callable[[], Any]], params_to_train: list[torch.Tensor] | None,
                 transform: GradientTransform | None, check_numerics: bool, lr_scheduler: Any = None,
                 summarize_gradients: bool = False) -> None:
        self.total_loss = total_loss
        self.optimizer = optimizer
        self.global_step = global_step
        self.update_ops = update_ops
        self.lr_scheduler = lr_scheduler
        self.check_numerics = check_numerics
        self.transform = transform
        self.summarize_gradients = summarize_gradients
        # Set by the train loop on steps whose summaries are due: keep that step's losses.
        self.record_losses = False
        self.last_losses: losses.LossCollection | None = None
        # Set by the train loop in a run over several processes: averages the gradients.
        self.gradient_sync: Callable[[], None] | None = None
        self._state = dict(state)
        self._all_params = [p for g in optimizer.param_groups for p in g["params"]]
        self._trained = params_to_train if params_to_train is not None else [p for p in self._all_params if p.requires_grad]
        self._backward_inputs = params_to_train  # None: plain backward(), as a hand-written loop does
        self._sync_numerics: bool | None = None  # decided on the first step, from the loss's device
        self._pending_finite: torch.Tensor | None = None
        self._pending_since = 0

    # ------------------------------------------------------------ the step

    def __call__(self, batch: Any = NO_BATCH) -> torch.Tensor:
        with losses.collect_losses() as collected:
            loss = self.total_loss() if batch is NO_BATCH else self.total_loss(batch)
        if self.record_losses:
            self.last_losses = collected
        if self._sync_numerics is None:
            self._first_step_checks(loss)
        if self.check_numerics:
            self._check_loss(loss)
        for p in self._all_params:
            p.grad = None
        if self._backward_inputs is None:
            loss.backward()
        else:
            loss.backward(inputs=self._backward_inputs)
        if self.gradient_sync is not None:
            self.gradient_sync()
        if self.transform is not None:
            for grad, param in self.transform([(p.grad, p) for p in self._trained]):
                param.grad = grad
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        for op in self.update_ops:
            op()
        if self.global_step is not None:
            self.global_step.increment()
        return loss.detach()

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

    def _check_loss(self, loss: torch.Tensor) -> None:
        if self._sync_numerics:
            if not math.isfinite(loss.item()):  # host sync, free on the CPU
                raise self._nonfinite_error(f"the loss is {loss.item()}")
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

    def _prefixed(self, name: str, key: str) -> str:
        return _prefixed(self._state, name, key)

    @property
    def trained_parameters(self) -> list[torch.Tensor]:
        """The parameters this op updates."""
        return list(self._trained)

    def grads_and_vars(self) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """The ``(gradient, parameter)`` pairs of the last step, for the parameters this op trains."""
        return [(p.grad, p) for p in self._trained]

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """Every trainable tensor this op owns, by its variable name."""
        return named_parameters(self._state)

    def model_variables(self) -> dict[str, torch.Tensor]:
        """Every variable (parameters and persistent buffers) this op owns, by name, as live tensors."""
        out: dict[str, torch.Tensor] = {}
        for name, holder in self._state.items():
            if isinstance(holder, torch.nn.Module):
                for k, t in holder.state_dict(keep_vars=True).items():
                    out[self._prefixed(name, canonical_name(k))] = t
            else:
                out[name] = holder
        return out

    def state_dict(self) -> dict[str, Any]:
        """Model variables, optimizer, LR scheduler and global step, for a checkpoint."""
        state: dict[str, Any] = {
            "model": {k: v.detach() for k, v in self.model_variables().items()},
            "optimizer": self.optimizer.state_dict(),
        }
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.global_step is not None:
            state["global_step"] = self.global_step.value
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a model that does not fit raises ``ValueError``."""
        variables = self.model_variables()
        saved = state["model"]
        missing = sorted(set(variables) - set(saved))
        unexpected = sorted(set(saved) - set(variables))
        wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(t.shape)}" for k, t in variables.items()
                 if k in saved and saved[k].shape != t.shape]
        if missing or unexpected or wrong:
            raise ValueError("the checkpoint does not fit this model: "
                             f"missing {missing or 'none'}; unexpected {unexpected or 'none'}; shape mismatches "
                             f"(checkpoint vs model) {wrong or 'none'}")
        with torch.no_grad():
            for k, t in variables.items():
                t.copy_(saved[k])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.global_step is not None and "global_step" in state:
            self.global_step.value = int(state["global_step"])

    def __repr__(self) -> str:
        return (f"TrainOp(modules={list(self.modules) or None}, optimizer={type(self.optimizer).__name__}, "
                f"step={self.step}, update_ops={len(self.update_ops)}, check_numerics={self.check_numerics})")
