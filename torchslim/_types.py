"""Protocols and small shared types: the seams between torchslim's modules.

Everything here is plain data or a structural ``Protocol``; no module state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

GradsAndVars = list[tuple["torch.Tensor | None", torch.Tensor]]
"""A list of ``(gradient, parameter)`` pairs; a gradient may be ``None``."""

GradientTransform = Callable[[GradsAndVars], GradsAndVars]
"""A pure function from ``(gradient, parameter)`` pairs to new pairs."""


@runtime_checkable
class Stateful(Protocol):
    """Anything whose state can be checkpointed: modules, optimizers, schedulers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class Policy(Protocol):
    """Decides, once per step, whether a service (save, log, summary) is due."""

    def should_trigger(self, step: int) -> bool: ...


class GlobalStep:
    """The number of training steps taken, kept on the host (reading it never syncs a device).

    Pass one instance to several train ops to make them share a count, as TF's
    graph-wide global step did.

    >>> step = GlobalStep()
    >>> step.value += 1
    >>> step.state_dict()
    {'global_step': 1}
    """

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"GlobalStep value must be a non-negative int, got {value!r}")
        self.value = value

    def increment(self) -> None:
        self.value += 1

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = int(state_dict["global_step"])

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"GlobalStep({self.value})"


class _Default:
    """The type of :data:`DEFAULT`: an argument left at its default, where ``None`` means something else."""

    def __repr__(self) -> str:
        return "<default>"


DEFAULT: Any = _Default()


class NonFiniteError(FloatingPointError):
    """A loss, gradient or state that must be finite holds NaN or Inf."""


def check_callable(value: object, name: str) -> None:
    """Raise ``TypeError`` unless ``value`` is callable (checked where it is passed in)."""
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {type(value).__name__}: {value!r}")


def check_positive(value: object, name: str, *, allow_none: bool = False, integer: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``value`` is a positive number (or None if allowed)."""
    if value is None and allow_none:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "a positive int" if integer else "a positive number"
        raise TypeError(f"`{name}` must be {what}{' or None' if allow_none else ''}, got {value!r}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"`{name}` must be positive, got {value!r}")
