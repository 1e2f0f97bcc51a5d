"""``create_train_op``'s arguments, checked and resolved: the model's state, the parameters to
train, the gradient multipliers, the update ops, and the in-place compile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from torchslim import gradients
from torchslim._checks import check_callable
from torchslim._modelstate import find_model_state, registered_update_ops
from torchslim._types import GlobalStep, GradientTransform


def _compile_in_place(module: torch.nn.Module) -> None:
    """``module.compile(fullgraph=True)``, as PyTorch's own does it (its ``_compiled_call_impl`` slot).

    ``Module.compile`` itself compiles ``Module._call_impl``, a frame in torch.nn that
    torch 2.13's dynamo skips when it is the top frame (with fullgraph=True it then
    finds nothing to compile); a frame of ours on top that calls it is traced whole.
    """
    def call(*args: Any, **kwargs: Any) -> Any:
        return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = torch.compile(call, fullgraph=True)


def _device_of(state: Mapping[str, Any]) -> torch.device:
    for holder in state.values():
        for t in holder.parameters() if isinstance(holder, torch.nn.Module) else [holder]:
            return t.device
    return torch.device("cpu")


def _check_global_step(global_step: object) -> GlobalStep | None:
    if global_step is not None and not isinstance(global_step, GlobalStep):
        raise TypeError(f"`global_step` must be a torchslim GlobalStep or None, got {global_step!r}")
    return global_step


def _model_state(total_loss: Callable[..., Any], optimizer: torch.optim.Optimizer,
                 model: Any) -> dict[str, Any]:
    if model is None:
        state = find_model_state(total_loss)
        how = "found from what `total_loss` refers to"
    elif isinstance(model, torch.nn.Module):
        state, how = {"": model}, "given as `model`"
    elif isinstance(model, Mapping) and model and all(
            isinstance(k, str) and isinstance(m, (torch.nn.Module, torch.Tensor)) for k, m in model.items()):
        state, how = dict(model), "given as `model`"
    else:
        raise TypeError("`model` must be a torch.nn.Module or a non-empty dict of name -> Module (or tensor), "
                        f"got {model!r}")
    owned = {id(t) for holder in state.values()
             for t in (holder.parameters() if isinstance(holder, torch.nn.Module) else [holder])}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stray = [tuple(p.shape) for p in params if id(p) not in owned]
    names = ", ".join(k or "<the model>" for k in state) or "none"
    if stray and state and len(stray) == len(params) and model is not None:
        raise ValueError(f"the optimizer's parameters are not the model's: none of its {len(params)} parameter(s) "
                         f"(shapes {stray[:5]}) belongs to `model`; make the optimizer from model.parameters()")
    if stray and state and len(stray) == len(params):
        raise ValueError(f"the optimizer's parameters are not those of the modules the loss function uses ({names}): "
                         f"none of its {len(params)} parameter(s) (shapes {stray[:5]}) belongs to them. Was the "
                         "optimizer made from another model's parameters?")
    if stray:
        raise ValueError(
            f"the optimizer updates {len(stray)} parameter(s) (shapes {stray[:5]}) that belong to none of the "
            f"modules {how} ({names}); pass the model explicitly: create_train_op(..., model=my_model)"
        )
    return state



def _variables_to_train(variables: Any, optimizer: torch.optim.Optimizer,
                        names: Mapping[str, torch.Tensor]) -> list[torch.Tensor] | None:
    if variables is None:
        return None
    if isinstance(variables, (str, torch.Tensor)) or not isinstance(variables, Iterable):
        raise TypeError(f"`variables_to_train` must be a list of parameters or names, got {variables!r}")
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    chosen: list[torch.Tensor] = []
    for v in variables:
        if isinstance(v, str):
            if v not in names:
                raise ValueError(f"`variables_to_train` names {v!r}, which is not a parameter; "
                                 f"known: {', '.join(names)}")
            v = names[v]
        elif not isinstance(v, torch.Tensor):
            raise TypeError(f"`variables_to_train` entries must be parameters or names, got {v!r}")
        if id(v) not in in_optimizer:
            raise ValueError(f"`variables_to_train` holds a parameter of shape {tuple(v.shape)} that the optimizer "
                             "does not update; add it to the optimizer's param_groups")
        chosen.append(v)
    if not chosen:
        raise ValueError("`variables_to_train` is empty: nothing would be trained")
    return chosen


def _multiply_transform(multipliers: Any, names: Mapping[str, torch.Tensor], trained: list[torch.Tensor] | None,
                        optimizer: torch.optim.Optimizer) -> GradientTransform:
    gradients.multiply_gradients([], multipliers, names)  # validates: a dict, not empty, known names, numbers
    trained_ids = {id(p) for p in (trained or [p for g in optimizer.param_groups for p in g["params"]])}
    for key in multipliers:
        param = names[key] if isinstance(key, str) else key
        if id(param) not in trained_ids:
            raise ValueError(f"gradient_multipliers has a multiplier for {key if isinstance(key, str) else 'a parameter'}"
                             ", which this train op does not train, so it has no gradient")

    def multiply(grads_and_vars: list) -> list:
        return gradients.multiply_gradients(grads_and_vars, multipliers, names)

    return multiply


def _resolve_update_ops(update_ops: Any, modules: list[torch.nn.Module]) -> list[Callable[[], Any]]:
    registered = registered_update_ops(modules)
    if update_ops is None:
        return registered
    if isinstance(update_ops, (str, bytes)) or not isinstance(update_ops, Iterable):
        raise TypeError(f"`update_ops` must be None, [] or a list of callables, got {update_ops!r}")
    ops = list(update_ops)
    for i, op in enumerate(ops):
        check_callable(op, f"update_ops[{i}]")
    left_out = [op for op in registered if all(op is not o for o in ops)]
    if ops and left_out:
        warnings.warn(f"`update_ops` leaves out {len(left_out)} update op(s) registered for this model; "
                      "they will not run in this train op", stacklevel=3)
    return ops
