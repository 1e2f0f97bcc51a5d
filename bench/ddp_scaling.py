"""Synchronous data parallelism: throughput of train() on 2 processes against 1 (gloo, loopback).

Model M (Linear(64,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10)), SGD
momentum 0.9, 64 examples per process per step, one thread per process. Each
process runs ``train()`` with ``master=tcp://127.0.0.1:<port>``, ``rank`` and
``world_size``: gradients are averaged by an all-reduce every step. The chief's
steady-state seconds per step come from clocks stamped on train_step's log line
every 50 steps (lower quartile of the intervals). Throughput is examples per
second summed over processes; ``scaling`` is throughput(N) / (N x throughput(1)),
1.0 being ideal. Runs of 1 and 2 processes are interleaved, medians over
repeats. On this 2-core machine the 2 processes also share the cores that the
all-reduce uses, so this is a report, not a target; the same script measures a
multi-core or multi-GPU machine.

    .venv/bin/python bench/ddp_scaling.py [--repeats 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

WORKER_ENV = "TORCHSLIM_BENCH_WORKER"


def worker(logdir: str, steps: int, rank: int, world_size: int, master: str | None) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from torchslim.learning import create_train_op, train

    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64 * world_size * 64, 64), torch.randint(0, 10, (64 * world_size * 64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    marks: list[tuple[int, float]] = []

    class Stamp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, str) and record.msg.startswith("global step"):
                marks.append((record.args[0], time.perf_counter()))  # type: ignore[index]

    log = logging.getLogger("torchslim")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(Stamp())
    op = create_train_op(lambda b: F.cross_entropy(model(b[0]), b[1]), opt)
    kwargs = {"master": master, "rank": rank, "world_size": world_size} if world_size > 1 else {}
    train(op, logdir, loader, number_of_steps=steps, log_every_n_steps=50, summary_op=None, progress_bar=False,
          **kwargs)
    if rank == 0:
        per_step = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
        print(json.dumps({"step_s": statistics.quantiles(per_step, n=4, method="inclusive")[0]}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world_size: int, steps: int) -> float:
    """Seconds per step on the chief of a run of ``world_size`` processes."""
    master = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as logdir:
        procs = [subprocess.Popen([sys.executable, __file__, logdir, str(steps), str(rank), str(world_size), master],
                                  env={**os.environ, WORKER_ENV: "1", "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.PIPE, text=True) for rank in range(world_size)]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise SystemExit(f"a worker failed: {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    runs: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for n in (1, 2) if rep % 2 == 0 else (2, 1):
            runs[n].append(measure(n, args.steps))
    one, two = (statistics.median(runs[n]) for n in (1, 2))
    throughput = {n: n * 64 / s for n, s in ((1, one), (2, two))}
    scaling = throughput[2] / (2 * throughput[1])
    print(f"model M, batch 64 per process, gloo on loopback, 1 thread per process, {os.cpu_count()} cores; "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'processes':>10}{'ms/step':>10}{'steps/s':>10}{'examples/s':>12}")
    for n, s in ((1, one), (2, two)):
        print(f"{n:>10}{s * 1e3:>10.2f}{1 / s:>10.1f}{throughput[n]:>12.0f}")
    print(json.dumps({"1": {"step_ms": round(one * 1e3, 2), "examples_per_s": round(throughput[1])},
                      "2": {"step_ms": round(two * 1e3, 2), "examples_per_s": round(throughput[2])},
                      "scaling": round(scaling, 3), "ideal": 1.0}))


if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        logdir, steps, rank, world_size, master = sys.argv[1:6]
        worker(logdir, int(steps), int(rank), int(world_size), master)
    else:
        main()
