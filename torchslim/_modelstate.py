"""What a train op owns: the model found from a loss function, its variable names, its update ops.

``create_train_op(total_loss, optimizer)`` needs no ``model=`` in the common
case: :func:`find_model_state` looks at what the loss function refers to. With
one module, variable names are its ``state_dict`` names; with several, each is
prefixed by the variable that holds it (``encoder.0.weight``).

Update ops (TF's ``UPDATE_OPS``) are registered on the model itself, the way
PyTorch keeps a module's forward hooks on the module: no registry outside it,
and a model that is garbage-collected takes its update ops with it.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from torchslim.variables import canonical_name

ModelState = Mapping[str, "torch.nn.Module | torch.Tensor"]
"""Name -> module or loose trainable tensor: what a train op checkpoints."""

_UPDATE_OPS_ATTR = "_torchslim_update_ops"


# ---------------------------------------------------------------- update ops


def add_update_op(model: torch.nn.Module, op: Callable[[], Any]) -> RemovableHandle:
    """Keep ``op`` on ``model``; the handle's ``remove()`` takes it off. Handle ids give the registration order."""
    ops = model.__dict__.setdefault(_UPDATE_OPS_ATTR, OrderedDict())
    handle = RemovableHandle(ops)
    ops[handle.id] = op
    return handle


def registered_update_ops(modules: Iterable[torch.nn.Module]) -> list[Callable[[], Any]]:
    """The update ops registered on ``modules`` or any of their submodules, in registration order."""
    found: dict[int, Callable[[], Any]] = {}
    for module in modules:
        for sub in module.modules():
            found.update(sub.__dict__.get(_UPDATE_OPS_ATTR, {}))
    return [found[k] for k in sorted(found)]


# ---------------------------------------------------------------- finding the model


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

    fn: Any = total_loss
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


# ---------------------------------------------------------------- names


def _prefixed(state: ModelState, name: str, key: str) -> str:
    # One model: plain state_dict names. Several: prefixed by the variable that holds each.
    return key if len(state) == 1 or not name else f"{name}.{key}"


def named_parameters(state: ModelState) -> list[tuple[str, torch.Tensor]]:
    """The trainable tensors of a train op's state (modules and loose tensors), by variable name."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, holder in state.items():
        if isinstance(holder, torch.nn.Module):
            out += [(_prefixed(state, name, canonical_name(k)), p) for k, p in holder.named_parameters()]
        else:
            out.append((name, holder))
    return out


def model_variables(state: ModelState) -> dict[str, torch.Tensor]:
    """Every variable (parameters and persistent buffers) of a train op's state, by name, as live tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, holder in state.items():
        if isinstance(holder, torch.nn.Module):
            for k, t in holder.state_dict(keep_vars=True).items():
                out[_prefixed(state, name, canonical_name(k))] = t
        else:
            out[name] = holder
    return out
