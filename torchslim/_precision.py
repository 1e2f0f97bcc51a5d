"""Numeric precision of a train op's step: where autocast and loss scaling plug in.

A :class:`Precision` answers four questions the step asks: what context to run
the loss function under, how to scale the loss before the backward pass, how
to unscale the gradients before anything reads them (clipping, multipliers,
summaries), and whether to step the optimizer. Full precision answers "none,
as it is, nothing to do, always".
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_NOTHING = contextlib.nullcontext()  # reusable: entered every step, made once


class Precision:
    """Full precision (fp32): the loss function runs as written and every update is applied."""

    name = "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the loss function runs under."""
        return _NOTHING

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor to back-propagate from."""
        return loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true values, in place, before they are read."""

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step ``optimizer``; return whether it stepped (a loss scaler skips updates with Inf gradients)."""
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep (a loss scaler's scale); nothing in full precision."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return self.name
