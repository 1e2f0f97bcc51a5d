"""Argument checks shared by the public functions: one checker per kind of value, one message each.

Every check raises at the call that received the argument, naming it, the
value given and what is accepted: ``TypeError`` for a value of the wrong type,
``ValueError`` for one of the right type out of range.

>>> check_positive_int(3, "number_of_steps")
>>> check_positive_int(0, "number_of_steps")
Traceback (most recent call last):
...
ValueError: `number_of_steps` must be positive, got 0
>>> check_seconds("1", "timeout", optional=True)
Traceback (most recent call last):
...
TypeError: `timeout` must be a number of seconds >= 0 or None, got '1'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch


def check_callable(value: object, name: str) -> None:
    """``value`` must be callable."""
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {type(value).__name__}: {value!r}")


def check_bool(value: object, name: str, *, optional: bool = False) -> None:
    """``value`` must be True or False (or None, if ``optional``)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"`{name}` must be True or False{' or None' if optional else ''}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: object, name: str, *, optional: bool = False) -> None:
    """A count of steps, batches, threads: an int > 0 (or None, if ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value):
        raise TypeError(f"`{name}` must be a positive int{' or None' if optional else ''}, got {value!r}")
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be positive, got {value!r}")


def check_non_negative_int(value: object, name: str, *, optional: bool = False) -> None:
    """A count that may be zero (a rank, a number of checkpoints to keep): an int >= 0 (or None)."""
    if optional and value is None:
        return
    if not _is_int(value):
        raise TypeError(f"`{name}` must be an int >= 0{' or None' if optional else ''}, got {value!r}")
    if value < 0:  # type: ignore[operator]
        raise ValueError(f"`{name}` must be an int >= 0{' or None' if optional else ''}, got {value!r}")


def check_positive(value: object, name: str, *, optional: bool = False) -> None:
    """An amount that must be above zero (a norm, an interval): a number > 0 (or None)."""
    if optional and value is None:
        return
    if not _is_number(value):
        raise TypeError(f"`{name}` must be a positive number{' or None' if optional else ''}, got {value!r}")
    if not value > 0:  # type: ignore[operator]  # also rejects NaN
        raise ValueError(f"`{name}` must be positive, got {value!r}")


def check_non_negative(value: object, name: str, *, optional: bool = False, what: str = "a number") -> None:
    """An amount that may be zero (a clipping norm, where 0 means none): a number >= 0 (or None)."""
    if optional and value is None:
        return
    what = f"{what} >= 0{' or None' if optional else ''}"
    if not _is_number(value):
        raise TypeError(f"`{name}` must be {what}, got {value!r}")
    if not value >= 0:  # type: ignore[operator]  # also rejects NaN
        raise ValueError(f"`{name}` must be {what}, got {value!r}")


def check_seconds(value: object, name: str, *, optional: bool = False) -> None:
    """A duration that may be zero (a timeout, a grace period): a number of seconds >= 0 (or None)."""
    check_non_negative(value, name, optional=optional, what="a number of seconds")


def check_directory(path: str | os.PathLike[str] | None, name: str) -> None:
    """``path`` is None, a directory, or nothing yet (to be made): not a file, not under one."""
    if path is None:
        return
    path = os.path.abspath(os.fspath(path))
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"is under a file ({probe})"
        raise ValueError(f"`{name}` {path!r} {where}; it must be a directory (or not exist yet, to be made)")


def check_fits(targets: Mapping[str, torch.Tensor], values: Mapping[str, Any], source: str, *,
               values_are: str = "checkpoint", ignore_missing: bool = False, unexpected: list[str] | None = None,
               hint: str = "") -> list[str]:
    """Raise ``ValueError`` unless ``values`` has a tensor of the right shape for every target, by name.

    The one "does this state fit this model" check, for a resume, a warm start
    and an evaluation alike. ``unexpected`` lists names the source has and the
    model lacks (an error where a state must match exactly); ``values_are`` names
    the source's side in a shape mismatch ("checkpoint", "value"). Returns the names
    that are missing when ``ignore_missing`` lets them pass.
    """
    missing = [n for n in targets if n not in values]
    wrong = [f"{n} (model {tuple(t.shape)}, {values_are} {tuple(values[n].shape)})"
             for n, t in targets.items() if n in values and tuple(values[n].shape) != tuple(t.shape)]
    problems = []
    if missing and not ignore_missing:
        problems.append(f"it has no value for: {', '.join(missing)}")
    if wrong:
        problems.append(f"shape mismatch in {', '.join(wrong)}")
    if unexpected:
        problems.append(f"it has values the model lacks: {', '.join(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not fit the model: {'; '.join(problems)}{'. ' + hint if hint else ''}")
    return missing



def check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], saved_class: str | None,
                         source: str) -> list[str]:
    """Raise ``ValueError`` unless ``saved`` (an optimizer's state_dict) can be loaded into ``optimizer``.

    The optimizer's type (when the checkpoint recorded it), its hyperparameter
    names and its param-group layout must match. Returns the hyperparameters
    whose values differ, as ``"group 0 lr: checkpoint 0.1, this run 0.05"``: the
    checkpoint's values are the ones that load (PyTorch's ``load_state_dict``).
    """
    ours = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    groups, saved_groups = optimizer.param_groups, list(saved.get("param_groups", []))
    fix = ("resume with the optimizer it was trained with, or train in a new logdir and warm-start the weights "
           "with init_fn=variables.assign_from_checkpoint_fn(...)")
    if saved_class is not None and saved_class != ours:
        raise ValueError(f"{source} holds the state of a {saved_class}; this run's optimizer is a {ours}: {fix}")
    keys = [sorted(set(g) - {"params"}) for g in groups]
    saved_keys = [sorted(set(g) - {"params"}) for g in saved_groups]
    if saved_groups and keys and set(saved_keys[0]) != set(keys[0]) and saved_class is None:
        raise ValueError(f"{source} holds an optimizer with hyperparameters {saved_keys[0]}; this run's {ours} has "
                         f"{keys[0]} (another type of optimizer?): {fix}")
    layout = [len(g["params"]) for g in groups]
    saved_layout = [len(g["params"]) for g in saved_groups]
    if layout != saved_layout:
        raise ValueError(f"{source} holds an optimizer with param groups of {saved_layout} parameters; this run's "
                         f"has groups of {layout}: the model or the optimizer's param_groups changed. {fix}")
    differ = []
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        for key in sorted(set(group) & set(saved_group) - {"params"}):
            if key == "lr" and "initial_lr" in group and "initial_lr" in saved_group:
                continue  # a scheduler's current value; its starting point is compared as initial_lr
            if not _same(group[key], saved_group[key]):
                differ.append(f"group {i} {key}: checkpoint {saved_group[key]!r}, this run {group[key]!r}")
    return differ


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)
