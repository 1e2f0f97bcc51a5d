"""Numeric precision of a train op's step: where autocast and loss scaling plug in.

A :class:`Precision` answers the questions the step asks: what context to run
the loss function under, how to scale the loss before the backward pass, how
to unscale the gradients before anything reads them (clipping, multipliers,
summaries), and whether the optimizer stepped. Full precision answers "none,
as it is, nothing to do, always". :func:`make_precision` turns
``create_train_op``'s ``precision`` argument into one, checking that the
model's device can run it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch

log = logging.getLogger("torchslim")

_NOTHING = contextlib.nullcontext()  # reusable: entered every step, made once

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Full precision (fp32): the loss function runs as written and every update is applied."""

    name = "fp32"
    skipped_updates = 0

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

    def summary(self) -> dict[str, float]:
        """Scalars for the run's summaries (a loss scaler's scale and skipped updates; none here)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep (a loss scaler's scale); nothing in full precision."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return self.name


class Autocast(Precision):
    """Mixed precision: the loss function runs under ``torch.autocast`` (bf16 needs no loss scaling)."""

    def __init__(self, name: str, device_type: str, dtype: torch.dtype) -> None:
        self.name, self.device_type, self.dtype = name, device_type, dtype
        # One context object, entered every step (torch.autocast can be re-entered once exited).
        self._autocast = torch.autocast(device_type, dtype=dtype)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self._autocast


class LossScaling(Autocast):
    """fp16: autocast, and a ``torch.amp.GradScaler`` that scales the loss and skips updates with Inf/NaN gradients.

    A skipped update does not step the optimizer, the LR scheduler or the global
    step; it is counted (``skipped_updates``, checkpointed with the scaler) and
    the scale is lowered, as ``GradScaler.update`` does.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__("fp16", device_type, torch.float16)
        self.scaler = torch.amp.GradScaler(device_type)
        self.skipped_updates = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        before = self.scaler.get_scale()  # host sync; GradScaler.step reads found-inf on the host anyway
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= before:  # lowered only when the update had Inf/NaN gradients
            return True
        self.skipped_updates += 1
        return False

    def summary(self) -> dict[str, float]:
        return {"loss_scale": self.scaler.get_scale(), "skipped_updates": float(self.skipped_updates)}

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self.skipped_updates = int(state.get("skipped_updates", 0))


def make_precision(precision: object, device: torch.device) -> Precision:
    """The :class:`Precision` named ``precision`` for a model on ``device``; ValueError if it cannot run there."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "fp32":
        return Precision()
    name, dtype = str(precision), PRECISIONS[str(precision)]
    assert dtype is not None
    said = f"torch has no autocast for {device.type!r}"
    enabled = torch.amp.is_autocast_available(device.type)
    if enabled:
        with warnings.catch_warnings(record=True) as caught:  # torch warns and disables what the device cannot run
            warnings.simplefilter("always")
            try:
                made: Precision = LossScaling(device.type) if name == "fp16" else Autocast(name, device.type, dtype)
            except RuntimeError as e:
                made, caught = Precision(), [warnings.WarningMessage(str(e), RuntimeWarning, "", 0)]
            enabled = isinstance(made, Autocast) and made._autocast._enabled
            if isinstance(made, LossScaling):
                enabled = enabled and made.scaler.is_enabled()
        said = "; ".join(str(w.message) for w in caught) or said
    if not enabled:
        raise ValueError(f"`precision`={name!r} cannot run on the model's device ({device}): {said}. "
                         "Use precision='fp32' (or 'bf16' where the device supports it)")
    if device.type == "cpu" and not _cpu_has_native(dtype):
        warnings.warn(f"precision={name!r}: this CPU has no native {name} matrix instructions "
                      f"(torch sees {torch.backends.cpu.get_cpu_capability()}); {name} is emulated here and "
                      "slower than fp32", stacklevel=3)
    return made


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` matrix products natively on this CPU (AVX512-BF16/AMX; AVX512-FP16/AMX-FP16)."""
    mkldnn = torch.ops.mkldnn
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(mkldnn, check)())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: say nothing
