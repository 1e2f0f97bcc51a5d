"""Metrics for evaluation: streaming objects, plain functions made into batch means, results as scalars.

A metric is anything with ``update(predictions, targets)``, ``compute()`` and
``reset()`` (torchmetrics' as they are); a plain ``fn(predictions, targets)``
becomes a :class:`BatchMean`, its value averaged over batches weighted by batch
size, with the sums kept on the device until ``compute``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


class BatchMean:
    """A plain ``fn(predictions, targets)`` as a metric: its mean over batches, weighted by batch size.

    Sums stay on the device (no host sync per batch); they are read once, in ``compute``.
    """

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.total: Any = 0.0
        self.count = 0

    def update(self, predictions: Any, targets: Any) -> None:
        value, n = self.fn(predictions, targets), _batch_size(targets)
        if isinstance(self.total, torch.Tensor):
            self.total.add_(value, alpha=n)  # one kernel per batch, summed in float64
        elif isinstance(value, torch.Tensor):  # float64 where the device has it
            self.total = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64) * n
        else:
            self.total += value * n
        self.count += n

    def compute(self) -> Any:
        return self.total / self.count if self.count else float("nan")


def _batch_size(targets: Any) -> int:
    if isinstance(targets, torch.Tensor):
        return targets.shape[0] if targets.dim() else 1
    return len(targets) if hasattr(targets, "__len__") else 1


def as_scalars(name: str, value: Any, what: str) -> dict[str, float]:
    """A value as ``{tag: float}``: a mapping's entries become ``name/key``, a vector's ``name/i``."""
    join = (lambda k: f"{name}/{k}") if name else str
    if isinstance(value, Mapping):
        return {tag: v for k, item in value.items() for tag, v in as_scalars(join(k), item, what).items()}
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return {join(i): v for i, v in enumerate(value.detach().flatten().tolist())}
    if isinstance(value, (torch.Tensor, int, float)):
        return {name: float(value)}  # host sync: once per metric per evaluation
    raise TypeError(f"{what} gave a {type(value).__name__}; expected a number, a tensor or a dict of them")


def check_metrics(metrics: Any) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) and k for k in metrics):
        raise TypeError(f"`metrics` must be a dict of name -> metric, got {metrics!r:.100}")
    out = {}
    for name, metric in metrics.items():
        if all(callable(getattr(metric, m, None)) for m in ("update", "compute", "reset")):
            out[name] = metric  # torchmetrics' metrics, or any object of this shape
        elif callable(metric):
            out[name] = BatchMean(metric)
        else:
            raise TypeError(f"`metrics[{name!r}]` must have update/compute/reset (e.g. a torchmetrics metric) or be "
                            f"a callable fn(predictions, targets) -> number, got {type(metric).__name__}")
    return out
