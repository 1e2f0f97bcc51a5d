"""Which weights: pick a model's variables by name, and warm-start them from a checkpoint.

Names are ``state_dict`` names (``conv0.weight``), with the prefixes that
wrappers add (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``)
removed by :func:`canonical_name`. Scopes match whole name components:
``"fc"`` matches ``fc.weight`` and ``fc.0.bias`` but not ``fc2.weight``.

Warm start, as in TF-Slim: restore every variable except the classifier from
another model's checkpoint, on a fresh start only.

>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
>>> sorted(get_variables_to_restore(model, exclude=["1"]))
['0.bias', '0.weight']

``assign_from_checkpoint_fn(path, get_variables_to_restore(model, exclude=["1"]))``
then returns an ``init_fn`` for ``learning.train``.

Sources that can be read: a torchslim checkpoint (or a logdir, meaning its
latest checkpoint; the train op's model variables are used), a ``.safetensors``
file, and a PyTorch ``state_dict`` file (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import safetensors.torch
import torch

from torchslim import checkpoint
from torchslim._checks import check_fits

__all__ = [
    "assign_from_checkpoint_fn",
    "assign_from_values_fn",
    "canonical_name",
    "get_model_variables",
    "get_variables_to_restore",
    "load_variables",
]

log = logging.getLogger("torchslim")

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Remove the prefixes that DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) add.

    >>> canonical_name("module._orig_mod.conv0.weight")
    'conv0.weight'
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def _in_scope(name: str, scope: str) -> bool:
    scope = scope.rstrip(".")
    return name == scope or name.startswith(scope + ".")


def _check_scopes(scopes: object, arg: str) -> list[str] | None:
    if scopes is None:
        return None
    if isinstance(scopes, str) or not isinstance(scopes, Iterable):
        raise TypeError(f"`{arg}` must be a list of name prefixes, got {scopes!r}")
    scopes = list(scopes)
    if not all(isinstance(s, str) for s in scopes):
        raise TypeError(f"`{arg}` must be a list of name prefixes, got {scopes!r}")
    return scopes


def get_model_variables(model: torch.nn.Module, scope: str | None = None, suffix: str | None = None
                        ) -> dict[str, torch.Tensor]:
    """The model's variables (parameters and persistent buffers) by canonical name.

    Args:
        model: the module.
        scope: keep only names inside this scope.
        suffix: keep only names ending with this (e.g. ``"weight"``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        name = canonical_name(name)
        if (scope is None or _in_scope(name, scope)) and (suffix is None or name.endswith(suffix)):
            out[name] = tensor
    return out


def get_variables_to_restore(model: torch.nn.Module, include: Iterable[str] | None = None,
                             exclude: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The variables inside any ``include`` scope and outside every ``exclude`` scope.

    ``include=None`` means every variable; ``include=[]`` means none, as in TF-Slim.
    """
    include_ = _check_scopes(include, "include")
    exclude_ = _check_scopes(exclude, "exclude") or []
    return {
        name: t for name, t in get_model_variables(model).items()
        if (include_ is None or any(_in_scope(name, s) for s in include_))
        and not any(_in_scope(name, s) for s in exclude_)
    }


def load_variables(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read named tensors from a torchslim checkpoint or logdir, a safetensors file or a state_dict file.

    A logdir means the checkpoint :func:`torchslim.checkpoint.restore` picks: its
    newest readable one (a corrupt newest one is passed over with a warning).

    Raises:
        ValueError: nothing readable is at ``path``.
        CorruptCheckpointError: ``path`` is a checkpoint that does not read back, or a logdir none of whose do.
    """
    return checkpoint_variables(path)[1]


def checkpoint_variables(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """``(the file or checkpoint read, its named tensors)``, as :func:`load_variables`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = checkpoint.restore(path)
        if found is None:
            raise ValueError(f"{path!r} is neither a torchslim checkpoint nor a logdir holding one")
        path, state = found
        tensors = state.get("model", state)
        if not isinstance(tensors, Mapping):
            raise checkpoint.CorruptCheckpointError(f"checkpoint {path} holds no dict of tensors (its model is a "
                                                    f"{type(tensors).__name__})")
    elif not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path!r}")
    elif path.endswith(".safetensors"):
        tensors = safetensors.torch.load_file(path)
    else:
        tensors = _load_state_dict_file(path)
    return path, {canonical_name(k): v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def _load_state_dict_file(path: str) -> Mapping[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path!r} is not a safetensors file nor a state_dict readable with weights_only=True: {e}") from e
    for key in ("state_dict", "model"):  # common wrappers: {"model": sd, "optimizer": ...}
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _assign(targets: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], source: str, values_are: str,
            ignore_missing_vars: bool) -> int:
    """Copy ``values`` into ``targets`` by name, all or nothing; return how many were assigned."""
    missing = check_fits(targets, values, source, values_are=values_are,
                         ignore_missing=ignore_missing_vars,
                         hint="Pass ignore_missing_vars=True to skip missing ones, or a dict mapping checkpoint names "
                              "to variables")
    for name in missing:
        log.warning("%s has no value for %s; leaving it as it is", source, name)
    with torch.no_grad():
        for name, target in targets.items():
            if name in values:
                target.copy_(values[name])
    return len(targets) - len(missing)


def _targets(var_list: Any, train_op: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(var_list, torch.nn.Module):
        return get_model_variables(var_list)
    model_vars = train_op.model_variables() if train_op is not None else None
    if var_list is None or (not isinstance(var_list, Mapping) and all(isinstance(v, str) for v in var_list)):
        if model_vars is None:
            raise ValueError("naming variables (or passing None for all) needs the train op: "
                             "call the returned function with it, as learning.train does")
        if var_list is None:
            return model_vars
        unknown = [n for n in var_list if n not in model_vars]
        if unknown:
            raise ValueError(f"the model has no variables named: {', '.join(unknown)}")
        return {n: model_vars[n] for n in var_list}
    return var_list


def _check_var_list(var_list: object) -> None:
    if var_list is None or isinstance(var_list, torch.nn.Module):
        return
    if isinstance(var_list, Mapping):
        bad = [k for k, v in var_list.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"`var_list` must map checkpoint names to tensors; bad entries: {bad!r}")
        return
    if isinstance(var_list, (list, tuple)) and all(isinstance(v, str) for v in var_list):
        return
    raise TypeError("`var_list` must be None (all model variables), a module, a list of variable names, "
                    f"or a dict of checkpoint name -> tensor; got {type(var_list).__name__}")


def assign_from_checkpoint_fn(model_path: str | os.PathLike, var_list: Any = None,
                              ignore_missing_vars: bool = False) -> Callable[..., None]:
    """Return an ``init_fn`` that copies values from ``model_path`` into variables.

    Args:
        model_path: a torchslim checkpoint or logdir, a ``.safetensors`` file, or a
            ``state_dict`` file.
        var_list: what to fill: a dict of checkpoint name -> tensor (e.g. from
            :func:`get_variables_to_restore`, or renamed), a module, a list of the
            train op's variable names, or ``None`` for all of the train op's variables.
        ignore_missing_vars: skip (with a warning) variables the checkpoint lacks
            instead of raising.

    Returns:
        ``init_fn(train_op=None)``; ``learning.train`` calls it on a fresh start only.

    Raises:
        ValueError: ``model_path`` does not exist (here); missing names or shape
            mismatches (when called), listed in full.
    """
    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
        raise ValueError(f"`model_path` {model_path!r} does not exist")
    _check_var_list(var_list)

    def init_fn(train_op: Any = None) -> None:
        values = load_variables(model_path)
        count = _assign(_targets(var_list, train_op), values, f"checkpoint {model_path}", "checkpoint",
                        ignore_missing_vars)
        log.info("Warm-started %d variables from %s", count, model_path)

    return init_fn


def assign_from_values_fn(name_to_value: Mapping[str, Any], var_list: Any = None) -> Callable[..., None]:
    """Return an ``init_fn`` that sets variables by name from in-memory values (tensors or arrays).

    ``var_list`` is as in :func:`assign_from_checkpoint_fn`; by default the names
    are looked up among the train op's variables.
    """
    if not isinstance(name_to_value, Mapping) or not all(isinstance(k, str) for k in name_to_value):
        raise TypeError(f"`name_to_value` must be a dict of variable name -> value, got {type(name_to_value).__name__}")
    values = {k: torch.as_tensor(v) for k, v in name_to_value.items()}
    _check_var_list(var_list)

    def init_fn(train_op: Any = None) -> None:
        targets = _targets(var_list, train_op)
        unknown = [n for n in values if n not in targets]
        if unknown:
            raise ValueError(f"no variables named: {', '.join(unknown)}; known: {', '.join(sorted(targets))}")
        _assign({n: targets[n] for n in values}, values, "name_to_value", "value", False)

    return init_fn
