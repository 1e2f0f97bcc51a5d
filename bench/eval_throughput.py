"""How much slower is ``evaluation.evaluate_once`` than a hand-written evaluation loop?

Model M: Linear(64, 1024) - ReLU - Linear(1024, 1024) - ReLU - Linear(1024, 10),
saved once as a torchslim checkpoint. Data: 8192 random examples with labels, a
``DataLoader`` (batch 64) over a ``TensorDataset``. Both sides do the same job:
restore the checkpoint's weights into a fresh copy of M, then compute the accuracy
over all the data in eval mode under ``torch.inference_mode()``.

* hand-written: ``checkpoint.load`` + ``load_state_dict``, then the plain loop
  ``correct += (model(x).argmax(1) == y).sum()``, read once at the end;
* ``evaluate_once``: ``metrics={"accuracy": fn}`` with
  ``fn = lambda p, t: (p.argmax(1) == t).float().mean()``, no summary writer (it
  also snapshots the model's weights and puts them back afterwards);
* for information, ``evaluate_once`` with torchmetrics' ``MulticlassAccuracy``
  (its own per-batch cost, not torchslim's).

Runs alternate after one warm-up of each (in an order reversed each round),
so drift in the machine hits all alike; medians of wall time and of the
process's CPU time are reported (the CPU time is the steadier of the two on a
shared machine), with ``torch.set_num_threads(1)``. The last line is one JSON
object: the hand-written and ``evaluate_once`` (plain fn) times and their
ratios (target: ratio <= 1.05).

    .venv/bin/python bench/eval_throughput.py [--repeats 11]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim import checkpoint, evaluation

EXAMPLES, BATCH = 8192, 64


def model_m() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def hand_written(path: str, loader: DataLoader) -> float:
    model = model_m()
    model.load_state_dict(checkpoint.load(path)["model"])
    model.eval()
    with torch.inference_mode():
        correct = torch.zeros((), dtype=torch.long)
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum()
        return correct.item() / EXAMPLES


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (predictions.argmax(1) == targets).float().mean()


def with_evaluate_once(path: str, loader: DataLoader) -> float:
    return evaluation.evaluate_once(path, None, model_m(), loader, metrics={"accuracy": accuracy},
                                    summary_writer=None)["accuracy"]


def with_torchmetrics(path: str, loader: DataLoader) -> float:
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=10, average="micro")
    return evaluation.evaluate_once(path, None, model_m(), loader, metrics={"accuracy": metric},
                                    summary_writer=None)["accuracy"]


def timed(fn, *args) -> tuple[float, float]:  # noqa: ANN001 - any callable
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed runs of each (default: %(default)s)")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs, labels = torch.randn(EXAMPLES, 64), torch.randint(0, 10, (EXAMPLES,))
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=BATCH)
    sides = {"hand-written loop": hand_written, "evaluate_once": with_evaluate_once}
    try:
        import torchmetrics  # noqa: F401

        sides["evaluate_once + torchmetrics"] = with_torchmetrics
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as logdir:
        path = checkpoint.save({"model": model_m().state_dict()}, checkpoint.checkpoint_path(logdir, 1))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        values = {name: fn(path, loader) for name, fn in sides.items()}  # warm-up, and the answers
        order = list(sides.items())
        for _ in range(args.repeats):
            for name, fn in order:
                times[name].append(timed(fn, path, loader))
            order.reverse()  # A B C, C B A, ...: no side always runs right after another
    if len({round(v, 9) for v in values.values()}) != 1:
        raise SystemExit(f"the sides disagree on the accuracy: {values}")
    wall = {name: statistics.median(t for t, _ in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
    hand = "hand-written loop"
    print(f"model M, {EXAMPLES} examples, batch {BATCH}, 1 thread, medians of {args.repeats} interleaved runs")
    print(f"{'side':<30} {'wall s':>8} {'ratio':>7} {'CPU s':>8} {'ratio':>7}")
    for name in times:
        print(f"{name:<30} {wall[name]:>8.4f} {wall[name] / wall[hand]:>7.3f} {cpu[name]:>8.4f} "
              f"{cpu[name] / cpu[hand]:>7.3f}")
    ours = "evaluate_once"
    print(json.dumps({"hand_written_s": round(wall[hand], 5), "evaluate_once_s": round(wall[ours], 5),
                      "ratio": round(wall[ours] / wall[hand], 4), "hand_written_cpu_s": round(cpu[hand], 5),
                      "evaluate_once_cpu_s": round(cpu[ours], 5), "cpu_ratio": round(cpu[ours] / cpu[hand], 4),
                      "repeats": args.repeats, "examples": EXAMPLES, "batch_size": BATCH, "threads": 1}))


if __name__ == "__main__":
    main()
