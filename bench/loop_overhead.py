"""How much per-step time does ``train()`` add to a hand-written PyTorch loop?

Setup (issue 2, acceptance point 9): one ``DataLoader`` over a TensorDataset of
8192 x 64 float32 inputs and 10-class labels, batch 64, no shuffle; SGD with
momentum 0.9; ``torch.set_num_threads(1)``; two models, S = Linear(64,128)-ReLU-
Linear(128,10) and M = Linear(64,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10).
Each model is trained, from the same seed, by

* raw: the idiomatic loop ``for x, y in loader: opt.zero_grad(set_to_none=True);
  loss = F.cross_entropy(model(x), y); loss.backward(); opt.step()``, re-entered
  each epoch, and
* torchslim: ``create_train_op(lambda batch: F.cross_entropy(model(batch[0]),
  batch[1]), opt)`` then ``train(op, logdir=<fresh temp dir>, data=loader,
  number_of_steps=N, log_every_n_steps=100, progress_bar=False)`` with every
  default service on: check_numerics, the checkpoint policy (every 600 s, so its
  clock is read each step), the summary policy where train() has one, the
  per-epoch data-position/RNG capture, signal handlers, and INFO logging every
  100 steps into a real handler (os.devnull).

Method. Both sides run the same short runs (S: 500 steps, M: 300 steps, so
each crosses 128-step epoch boundaries) and stamp the clock right after the
optimizer step of every 100th step: the raw loop with a step counter, torchslim
from a logging handler that receives train_step's "global step N" line (emitted
after the step, so no extra hook runs in the loop). Timing between stamps
counts the steady state, the per-step and per-epoch costs of both sides, and
leaves out the one-off costs. Every run builds its model afresh from a fixed
seed. Each repeat alternates 4 runs of each side (raw ts ts raw raw ts ...); a side's
per-step time in that repeat is the lower quartile of its pooled 100-step
intervals, since load from other processes on a shared machine only ever adds
time (here the median interval moved by up to 30% between back-to-back runs).
Reported: the median over repeats of each side's time, and as ``ratio`` the
median of the per-repeat ratios (each repeat's two sides ran interleaved, so
drift between repeats cancels; the ratio of the two medians can differ from it).
The clock is process CPU time by default, which a descheduled process does not
accrue; ``--clock wall`` puts wall time in the JSON line; the table shows both.
The one-off costs of ``train()`` (argument checks, looking for a checkpoint,
opening writers, the final checkpoint save, which the raw loop does not do) are
shown apart as "fixed ms": end-to-end wall time minus the stamped window minus
the steps outside it at the per-step time. Timing train() end to end and
subtracting a separately timed ``Saver.save`` was rejected: one save varies by
more than the per-step overhead being measured. Both sides must end at the same
loss bit for bit (checked): they did the same work. One warm-up run of each
side comes first. The last line printed is one JSON object, ``{"S": {"raw_us",
"torchslim_us", "ratio"}, "M": {...}}``. Targets: ratio <= 1.05 for S, <= 1.02
for M.

    .venv/bin/python bench/loop_overhead.py [--repeats 7] [--clock cpu|wall] [--quick]

End to end (``--e2e``): the lower quartile of 100-step intervals can leave out
epoch boundaries and other periodic costs, so this mode times whole runs of
model S (3300 steps, about 26 epochs, 1 thread; wall clock from before the loop
or the ``train()`` call to its return, so train()'s start, its checkpoint saves
and its final save count too), each side in its own fresh process, the sides
interleaved and paired per repeat: ``raw`` (the loop above), ``ce`` (train()
with a loss function returning ``F.cross_entropy``) and ``losses`` (train()
with ``losses.sparse_softmax_cross_entropy`` + ``losses.get_total_loss()``).
Its JSON line is ``{"S_e2e": {"raw_us", "ce_ratio", "losses_ratio"}}``;
targets: both ratios <= 1.05.

    .venv/bin/python bench/loop_overhead.py --e2e [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.learning import create_train_op, train

LOG_EVERY = 100
SEED = 0
ROUNDS = 4  # runs of each side per repeat, alternating


def model_s() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def model_m() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def fresh(build: Callable[[], nn.Module]) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model = build()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


class Run(NamedTuple):
    wall: list[float]  # seconds per step over each 100-step interval, wall clock
    cpu: list[float]  # the same, process CPU time
    fixed_wall: float  # one-off seconds of the whole loop / the whole train() call
    loss: float


class Stamps(logging.Handler):
    """Stamps the clocks when train_step logs "global step N: ..." (called on logging steps only)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[int, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("global step"):
            self.marks.append((record.args[0], *now()))  # type: ignore[index]


def finish(marks: list[tuple[int, float, float]], start: float, steps: int, loss: float) -> Run:
    total = time.perf_counter() - start
    wall, cpu = ([(b[i] - a[i]) / (b[0] - a[0]) for a, b in zip(marks, marks[1:], strict=False)] for i in (1, 2))
    (s0, w0, _), (s1, w1, _) = marks[0], marks[-1]
    fixed = total - (w1 - w0) - (steps - (s1 - s0)) * lower_quartile(wall)
    return Run(wall, cpu, fixed, loss)


def lower_quartile(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=4, method="inclusive")[0] if len(xs) > 1 else xs[0]


def raw_loop(model: nn.Module, opt: torch.optim.Optimizer, loader: torch.utils.data.DataLoader, steps: int,
             marks: list[tuple[int, float, float]] | None = None) -> torch.Tensor:
    """The hand-written loop, over epochs until ``steps`` updates; a stamp in ``marks`` after every 100th. Its last loss."""
    step = 0
    while step < steps:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step += 1
            if marks is not None and step % LOG_EVERY == 0:
                marks.append((step, *now()))
            if step == steps:
                break
    return loss


def run_raw(build: Callable[[], nn.Module], loader: torch.utils.data.DataLoader, steps: int) -> Run:
    """The hand-written loop, with a stamp after every 100th optimizer step."""
    model, opt = fresh(build)
    marks: list[tuple[int, float, float]] = []
    start = time.perf_counter()
    loss = raw_loop(model, opt, loader, steps, marks)
    return finish(marks, start, steps, loss.item())


def run_torchslim(build: Callable[[], nn.Module], loader: torch.utils.data.DataLoader, steps: int,
                  stamps: Stamps) -> Run:
    """train() with its default services; the stamps come from its own every-100-steps log line."""
    model, opt = fresh(build)
    logdir = tempfile.mkdtemp(prefix="loop_overhead_")
    try:
        train_op = create_train_op(lambda batch: F.cross_entropy(model(batch[0]), batch[1]), opt)
        stamps.marks.clear()
        start = time.perf_counter()
        loss = train(train_op, logdir=logdir, data=loader, number_of_steps=steps,
                     log_every_n_steps=LOG_EVERY, progress_bar=False)
        result = finish(stamps.marks, start, steps, loss)
        assert train_op.step == steps and f"model.ckpt-{steps}" in os.listdir(logdir), os.listdir(logdir)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- end to end (issue 12, point 8)

E2E_STEPS = 3300


def e2e_one(side: str, steps: int) -> float:
    """One process's whole run of model S, wall clock from before the loop (or the train() call) to its end, s/step.

    ``raw``: the hand-written loop with ``F.cross_entropy``; ``ce``: train() with a loss
    function returning ``F.cross_entropy``; ``losses``: train() with
    ``losses.sparse_softmax_cross_entropy`` + ``losses.get_total_loss()``.
    """
    from torchslim import losses

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    dataset = torch.utils.data.TensorDataset(torch.randn(8192, 64), torch.randint(0, 10, (8192,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False)
    model, opt = fresh(model_s)
    if side == "raw":
        start = time.perf_counter()
        raw_loop(model, opt, loader, steps)
        return (time.perf_counter() - start) / steps

    def with_losses(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        losses.sparse_softmax_cross_entropy(model(batch[0]), batch[1])
        return losses.get_total_loss()

    loss_fn = with_losses if side == "losses" else (lambda batch: F.cross_entropy(model(batch[0]), batch[1]))
    logdir = tempfile.mkdtemp(prefix="loop_overhead_e2e_")
    try:
        op = create_train_op(loss_fn, opt, model=model)
        logging.getLogger("torchslim").addHandler(logging.NullHandler())
        start = time.perf_counter()
        train(op, logdir, loader, number_of_steps=steps, log_every_n_steps=LOG_EVERY, progress_bar=False)
        return (time.perf_counter() - start) / steps
    finally:
        shutil.rmtree(logdir, ignore_errors=True)


def e2e_main(repeats: int, steps: int) -> None:
    """raw, ce and losses in separate processes, interleaved, each repeat's ratios paired; table and JSON line."""
    import subprocess
    import sys

    sides = ["raw", "ce", "losses"]
    times: dict[str, list[float]] = {s: [] for s in sides}
    for rep in range(repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            out = subprocess.run([sys.executable, __file__, "--e2e-one", side, "--e2e-steps", str(steps)],
                                 capture_output=True, text=True, check=True)
            times[side].append(float(out.stdout.strip().splitlines()[-1]))
    med = statistics.median
    print(f"end to end: model S, 1 thread, {steps} steps per process (whole run, wall clock, final checkpoint "
          f"included), {repeats} repeats, sides interleaved; ratio: median of the per-repeat ratios to raw")
    print(f"{'side':<8}{'us/step':>10}{'diff us':>9}{'ratio':>8}{'per-repeat min..max':>22}")
    summary = {"raw_us": round(med(times['raw']) * 1e6, 1)}
    for side in sides:
        ratios = sorted(t / r for t, r in zip(times[side], times["raw"], strict=True))
        print(f"{side:<8}{med(times[side]) * 1e6:>10.1f}{(med(times[side]) - med(times['raw'])) * 1e6:>9.1f}"
              f"{med(ratios):>8.3f}{f'{ratios[0]:.3f}..{ratios[-1]:.3f}':>22}")
        if side != "raw":
            summary[f"{side}_ratio"] = round(med(ratios), 4)
    print("targets: ce_ratio and losses_ratio <= 1.05")
    print(json.dumps({"S_e2e": summary}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each side (default: %(default)s)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="the clock of the JSON line: process CPU time (default) or wall time")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 run per side: a smoke run, not a result")
    parser.add_argument("--e2e", action="store_true",
                        help="instead: whole runs of model S end to end, each side in its own process (issue 12)")
    parser.add_argument("--e2e-steps", type=int, default=E2E_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--e2e-one", choices=("raw", "ce", "losses"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.e2e_one:
        print(e2e_one(args.e2e_one, args.e2e_steps))
        return
    if args.e2e:
        e2e_main(3 if args.quick else args.repeats, args.e2e_steps)
        return
    repeats = 3 if args.quick else args.repeats
    rounds = 1 if args.quick else ROUNDS
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    # Steps per run: multiples of the 100-step stamp, over at least two 128-step epochs.
    steps = {"S": 500, "M": 300}
    builds = {"S": model_s, "M": model_m}

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    dataset = torch.utils.data.TensorDataset(torch.randn(8192, 64), torch.randint(0, 10, (8192,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=False)

    log = logging.getLogger("torchslim")
    log.setLevel(logging.INFO)
    log.propagate = False
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed at the end
    log.addHandler(logging.StreamHandler(devnull))  # the log line is really formatted and written
    stamps = Stamps()
    log.addHandler(stamps)

    # per model and side: one (step_wall, step_cpu, fixed_wall) per repeat
    results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for name, build in builds.items():
        run_raw(build, loader, 2 * LOG_EVERY)  # warm-up: allocator, kernels, first-step checks
        run_torchslim(build, loader, 2 * LOG_EVERY, stamps)
        results[name] = {"raw": [], "ts": []}
    for rep in range(repeats):
        for name, build in builds.items():
            pooled: dict[str, list[Run]] = {"raw": [], "ts": []}
            for k in range(rounds):  # raw ts ts raw raw ts ...: drift hits both sides alike
                for side in ("raw", "ts") if (rep * rounds + k) % 2 == 0 else ("ts", "raw"):
                    pooled[side].append(run_raw(build, loader, steps[name]) if side == "raw"
                                        else run_torchslim(build, loader, steps[name], stamps))
                raw_loss, ts_loss = pooled["raw"][-1].loss, pooled["ts"][-1].loss
                if raw_loss != ts_loss:  # same seed, same batches, same ops: bit for bit
                    raise SystemExit(f"{name}: the two sides diverged (final loss {raw_loss} vs {ts_loss})")
            for side, side_runs in pooled.items():
                results[name][side].append((lower_quartile([t for r in side_runs for t in r.wall]),
                                            lower_quartile([t for r in side_runs for t in r.cpu]),
                                            statistics.median(r.fixed_wall for r in side_runs)))

    med = statistics.median
    print(f"torch {torch.__version__}, 1 thread, batch 64, SGD momentum 0.9; {repeats} repeats of {rounds} "
          f"interleaved runs per side; per-step us: lower quartile of a repeat's {LOG_EVERY}-step intervals, "
          "median over repeats; ratio: median of the per-repeat ratios")
    print(f"{'model':<6}{'clock':<6}{'steps':>6}{'raw us':>10}{'torchslim us':>14}{'diff us':>9}{'ratio':>8}"
          f"{'per-repeat ratios min..max':>28}{'fixed ms raw/ts':>17}")
    summary = {}
    for name in builds:
        raw, ts = results[name]["raw"], results[name]["ts"]
        for i, clock in enumerate(("wall", "cpu")):
            r, t = [x[i] for x in raw], [x[i] for x in ts]
            ratios = sorted(b / a for a, b in zip(r, t, strict=True))
            fixed = f"{med(x[2] for x in raw) * 1e3:.1f}/{med(x[2] for x in ts) * 1e3:.1f}" if clock == "wall" else ""
            print(f"{name:<6}{clock:<6}{steps[name]:>6}{med(r) * 1e6:>10.1f}{med(t) * 1e6:>14.1f}"
                  f"{(med(t) - med(r)) * 1e6:>9.1f}{med(ratios):>8.3f}"
                  f"{f'{ratios[0]:.3f}..{ratios[-1]:.3f}':>28}{fixed:>17}")
            if clock == args.clock:
                summary[name] = {"raw_us": round(med(r) * 1e6, 1), "torchslim_us": round(med(t) * 1e6, 1),
                                 "ratio": round(med(ratios), 4)}
    print("fixed ms: one-off wall time of the whole loop / of train() (checks, checkpoint lookup, writers, "
          "final save): end-to-end minus the stamped window minus the steps outside it at the per-step time")
    print(f"JSON below: the {args.clock} clock; targets ratio <= 1.05 (S), <= 1.02 (M)")
    log.handlers.clear()
    devnull.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
