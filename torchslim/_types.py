"""Protocols and small shared types: the seams between torchslim's modules.

Everything here is plain data or a structural ``Protocol``; no module state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

GradsAndVars = list[tuple["torch.Tensor | None", torch.Tensor]]
"""A list of ``(gradient, parameter)`` pairs; a gradient may be ``None``."""

GradientTransform = Callable[[GradsAndVars], GradsAndVars]
"""A pure function from ``(gradient, parameter)`` pairs to new pairs."""


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


class GradientSync(Protocol):
    """How a train op's gradients are combined across processes, once per optimizer update.

    ``no_sync()`` wraps the backward pass of a micro-batch that does not end an
    update (nothing need be communicated yet); ``synchronize()`` runs after the
    backward pass that does, before the gradients are transformed and applied.
    """

    def no_sync(self) -> contextlib.AbstractContextManager[Any]: ...

    def synchronize(self) -> None: ...


class LocalGradients:
    """The :class:`GradientSync` of a single process: there is nothing to combine."""

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        pass
