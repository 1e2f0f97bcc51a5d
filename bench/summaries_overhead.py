"""How much do summaries every 100 steps add to ``train()``?

Model M of ``bench/loop_overhead.py`` (Linear(64,1024)-ReLU-Linear(1024,1024)-
ReLU-Linear(1024,10), SGD momentum 0.9, batch 64 from one DataLoader over 8192 x
64 random inputs, one thread), trained by ``train()`` twice per repeat:

* on: ``save_summaries_steps=100`` with the run's own scalars (total loss, each
  loss, learning rate, steps per second) and a histogram of every weight
  (``add_histogram_summaries(model.parameters())``), into TensorBoard event
  files and ``metrics.jsonl``;
* off: the same call with ``summary_op=None``.

Per-step time is measured as in ``loop_overhead.py``: clocks stamped by a
logging handler on train_step's every-100-steps log line, steady state from
step 100 to the last (so each 100-step interval holds one summary write), the
lower quartile of the intervals of a run, the median over interleaved repeats
(ABBA order). Both clocks are printed; the JSON line uses process CPU time by
default, which counts the background writer thread too. Target: ratio <= 1.03.

    .venv/bin/python bench/summaries_overhead.py [--repeats 7] [--clock cpu|wall] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from loop_overhead import Stamps  # noqa: E402  (the same clock stamps as the loop benchmark)

from torchslim import summaries
from torchslim.learning import create_train_op, train

LOG_EVERY = 100


def per_step(marks: list[tuple[int, float, float]], clock: int) -> float:
    """The lower quartile over the run's 100-step intervals of seconds per step."""
    xs = [(b[clock] - a[clock]) / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    return statistics.quantiles(xs, n=4, method="inclusive")[0] if len(xs) > 1 else xs[0]


def model_m() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def run(loader: torch.utils.data.DataLoader, steps: int, stamps: Stamps, on: bool) -> tuple[float, float]:
    """(wall, CPU) seconds per step of one train() call."""
    model = model_m()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    logdir = tempfile.mkdtemp(prefix="summaries_overhead_")
    try:
        if on:
            summaries.add_histogram_summaries(model.parameters())
        train_op = create_train_op(lambda batch: F.cross_entropy(model(batch[0]), batch[1]), opt)
        stamps.marks.clear()
        switch = {"save_summaries_steps": LOG_EVERY} if on else {"summary_op": None}
        train(train_op, logdir, loader, number_of_steps=steps, log_every_n_steps=LOG_EVERY,
              save_summaries_secs=None, progress_bar=False, **switch)
        result = per_step(stamps.marks, 1), per_step(stamps.marks, 2)
        wrote = any(n.startswith("events") for n in os.listdir(logdir))
        assert wrote == on, (on, os.listdir(logdir))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 repeats, fewer steps: a smoke run")
    args = parser.parse_args()
    repeats, steps = (3, 300) if args.quick else (args.repeats, 800)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(8192, 64), torch.randint(0, 10, (8192,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False)
    log = logging.getLogger("torchslim")
    log.setLevel(logging.INFO)
    log.propagate = False
    stamps = Stamps()
    log.addHandler(stamps)

    run(loader, 2 * LOG_EVERY, stamps, True)  # warm-up
    run(loader, 2 * LOG_EVERY, stamps, False)
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for rep in range(repeats):
        for on in (False, True) if rep % 2 == 0 else (True, False):
            results[on].append(run(loader, steps, stamps, on))
    med = statistics.median
    print(f"torch {torch.__version__}, model M, 1 thread, {steps} steps, summaries every {LOG_EVERY} steps "
          f"(scalars + a histogram of each of the 6 weights); median of {repeats} interleaved repeats")
    print(f"{'clock':<6}{'off us':>10}{'on us':>10}{'ratio':>8}")
    summary = {}
    for index, clock in ((2, "cpu"), (1, "wall")):
        off, on = (med(r[index - 1] for r in results[side]) for side in (False, True))
        print(f"{clock:<6}{off * 1e6:>10.1f}{on * 1e6:>10.1f}{on / off:>8.3f}")
        if clock == args.clock:
            summary = {"off_us": round(off * 1e6, 1), "on_us": round(on * 1e6, 1), "ratio": round(on / off, 4),
                       "clock": clock, "target": 1.03}
    log.handlers.clear()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
