"""What does in-process validation cost per training step, and how much of it is not the evaluation itself?

Setup (issue 15, acceptance point 7): model M = Linear(64,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10),
SGD with momentum 0.9, a ``DataLoader`` over 8192 x 64 float32 inputs with 10-class labels (batch 64, no
shuffle), ``torch.set_num_threads(1)``. One side trains N = 600 steps with ``train()`` as is; the other
adds ``validation=Validation(held_out, {"accuracy": fn}, every_n_steps=100)`` over 10 held-out batches
of 64 (a ``DataLoader``, so that each evaluation draws a loader seed from the global RNG, which must be
put back), and ``watch=Watch("accuracy", keep_best=0)`` so that the watch is counted but no extra
checkpoint is saved (a save is the checkpoint's cost, measured by its own bench). Both runs write
into a fresh logdir, summaries and periodic saves at their defaults (every 600 s: none in a run).

What is measured, per validated run, with ``time.perf_counter`` around the calls:

* the evaluation's time: ``_evalrun.run_pass``, the batches through the model and the metric;
* the bookkeeping: everything else the validation adds to the loop: its policy question on every
  step, the snapshot and restore of modes, buffers and the RNG states around each pass, the
  results written to ``<logdir>/eval`` (event file + metrics.jsonl, flushed), the log line, the
  watch's count, the progress-bar status; that is, the time in the validation service's hooks
  minus the time in ``run_pass``.

Each is divided by N and compared with the step time of the plain run (its ``train()`` wall time over
N, fixed costs included, so the ratio errs high). Runs alternate plain / validated, after one warm-up
of each; medians over repeats. For information, the end-to-end ratio of the two runs' wall times.
Targets: bookkeeping per step < 1% of the step. The last line printed is one JSON object.

    .venv/bin/python bench/validation_overhead.py [--repeats 5] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim import learning, validation
from torchslim.validation import Validation, ValidationService, Watch

EXAMPLES, BATCH, EVAL_BATCHES, EVERY = 8192, 64, 10, 100


def model_m() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (predictions.argmax(1) == targets).float().mean()


class Clock:
    """Seconds spent in the wrapped callables (the service's hooks, and run_pass inside them)."""

    def __init__(self) -> None:
        self.service = 0.0
        self.evaluation = 0.0

    def wrap(self, fn: Callable[..., Any], field: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - started)

        return timed


def run(loader: DataLoader, held_out: DataLoader | None, steps: int) -> tuple[float, Clock]:
    """One run of ``steps`` steps: (wall seconds of train(), the clock of the validation's parts)."""
    torch.manual_seed(0)
    model = model_m()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    op = learning.create_train_op(lambda batch: F.cross_entropy(model(batch[0]), batch[1]), opt)
    clock = Clock()
    kwargs: dict[str, Any] = {}
    if held_out is not None:
        kwargs = {"validation": Validation(held_out, {"accuracy": accuracy}, every_n_steps=EVERY),
                  "watch": Watch("accuracy", keep_best=0)}
    logdir = tempfile.mkdtemp()
    originals = (ValidationService.after_step, ValidationService.metadata, validation.run_pass)
    ValidationService.after_step = clock.wrap(originals[0], "service")  # type: ignore[method-assign]
    ValidationService.metadata = clock.wrap(originals[1], "service")  # type: ignore[method-assign]
    validation.run_pass = clock.wrap(originals[2], "evaluation")  # type: ignore[attr-defined]
    try:
        started = time.perf_counter()
        learning.train(op, logdir, loader, number_of_steps=steps, log_every_n_steps=100, progress_bar=False,
                       **kwargs)
        return time.perf_counter() - started, clock
    finally:
        ValidationService.after_step, ValidationService.metadata, validation.run_pass = originals  # type: ignore
        shutil.rmtree(logdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("torchslim").addHandler(logging.NullHandler())  # log lines formatted, then dropped
    logging.getLogger("torchslim").setLevel(logging.INFO)
    g = torch.Generator().manual_seed(0)
    train_set = TensorDataset(torch.randn(EXAMPLES, 64, generator=g), torch.randint(0, 10, (EXAMPLES,), generator=g))
    eval_set = TensorDataset(torch.randn(EVAL_BATCHES * BATCH, 64, generator=g),
                             torch.randint(0, 10, (EVAL_BATCHES * BATCH,), generator=g))
    loader, held_out = DataLoader(train_set, batch_size=BATCH), DataLoader(eval_set, batch_size=BATCH)
    run(loader, None, 50), run(loader, held_out, 2 * EVERY)  # warm-up
    rows = []
    print(f"{'repeat':>6} {'plain ms/step':>14} {'validated ms/step':>18} {'eval ms/step':>13} "
          f"{'bookkeeping us/step':>20} {'bookkeeping %':>14}")
    for repeat in range(args.repeats):
        plain, _ = run(loader, None, args.steps)
        validated, clock = run(loader, held_out, args.steps)
        step = plain / args.steps
        row = {"plain_ms": step * 1e3, "validated_ms": validated / args.steps * 1e3,
               "eval_ms_per_step": clock.evaluation / args.steps * 1e3,
               "bookkeeping_us_per_step": (clock.service - clock.evaluation) / args.steps * 1e6,
               "evaluations": args.steps // EVERY}
        row["bookkeeping_pct"] = row["bookkeeping_us_per_step"] / 1e3 / row["plain_ms"] * 100
        row["end_to_end_ratio"] = validated / plain
        rows.append(row)
        print(f"{repeat + 1:>6} {row['plain_ms']:>14.3f} {row['validated_ms']:>18.3f} "
              f"{row['eval_ms_per_step']:>13.3f} {row['bookkeeping_us_per_step']:>20.1f} "
              f"{row['bookkeeping_pct']:>13.3f}%")
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "evaluations"}
    summary["evaluations_per_run"] = args.steps // EVERY
    print(json.dumps({"M": summary}))


if __name__ == "__main__":
    main()
