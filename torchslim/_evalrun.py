"""One evaluation pass: a model, batches and metrics in, ``{name: value}`` out, the model left as found.

Below both :mod:`torchslim.evaluation` (a checkpoint restored into a model) and
in-process validation during ``learning.train`` (the live training model), so
that neither imports the other. :func:`evaluating` is what makes a pass safe in
the middle of training:

* every submodule's training flag is put back, and so is every buffer
  (BatchNorm's running statistics and batch counter): a model whose forward
  updates a buffer even in eval mode leaves no trace;
* no gradient is kept: the batches run under ``torch.inference_mode()``;
* the global RNG streams (torch CPU and CUDA, Python's ``random``, NumPy's) are
  put back, so that a ``DataLoader`` drawing its seed, or a model drawing noise,
  leaves the training run's random numbers where they were. With that, a run
  that validates ends with bitwise the same weights as one that does not.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from torchslim._data import capture_rng, restore_rng
from torchslim._metrics import as_scalars
from torchslim._prefetch import Prefetcher


def model_device(model: torch.nn.Module) -> torch.device:
    return next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def default_eval_fn(model: torch.nn.Module) -> Callable[[Any], tuple[Any, Any]]:
    """``batch -> (model(inputs), targets)`` for ``(inputs, targets)`` batches, moved to the model's device."""
    device = model_device(model)

    def eval_fn(batch: Any) -> tuple[Any, Any]:
        try:
            inputs, targets = batch
        except (TypeError, ValueError):
            raise TypeError("the default `eval_fn` takes (inputs, targets) batches, got a "
                            f"{type(batch).__name__}; pass eval_fn=lambda batch: (predictions, targets)") from None
        return model(_to(inputs, device)), _to(targets, device)

    return eval_fn


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards the modes, the buffers and the global RNG states are put back."""
    modes = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        buffers = [(b, b.clone()) for b in model.buffers()]
    rng = capture_rng()
    model.eval()
    try:
        yield
    finally:
        restore_rng(rng)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for m, training in modes:
            m.training = training


def run_pass(metrics: Mapping[str, Any], batches: Iterable[Any], eval_fn: Callable[[Any], tuple[Any, Any]], *,
             initial_op: Callable[[], Any] | None = None, eval_op: Callable[[Any], Any] | None = None,
             final_op: Callable[[], Any] | None = None,
             stops: Iterable[Callable[[int], bool]] = ()) -> tuple[dict[str, float], int]:
    """Run ``batches`` through the metrics (reset before and after) under inference mode: ``(results, batches)``.

    ``metrics`` are objects with ``update``/``compute``/``reset``; ``stops`` are
    called with the number of batches done, and any True ends the pass.
    """
    stops = list(stops)
    for metric in metrics.values():
        metric.reset()
    try:
        with torch.inference_mode():
            if initial_op is not None:
                initial_op()
            n = 0
            try:
                for batch in batches:  # data that runs out ends the pass
                    if metrics:
                        predictions, targets = eval_fn(batch)
                        for metric in metrics.values():
                            metric.update(predictions, targets)
                    if eval_op is not None:
                        eval_op(batch)
                    n += 1
                    if stops and any(stop(n) for stop in stops):
                        break
            finally:
                if isinstance(batches, Prefetcher):
                    batches.close()  # joins its thread, also when a hook stopped early
            results = {k: v for name, metric in metrics.items()
                       for k, v in as_scalars(name, metric.compute(), f"metric {name!r}").items()}
            final = final_op() if final_op is not None else None
            if final is not None:
                results.update(as_scalars("" if isinstance(final, Mapping) else "final_op", final, "`final_op`"))
    finally:
        for metric in metrics.values():  # their states were made in inference mode: leave none behind
            metric.reset()
    return results, n
