"""Synchronous data parallelism: throughput of train() on 2 processes against 1 (gloo, loopback), per engine.

Model M (Linear(64,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10)), SGD
momentum 0.9, 64 examples per process per step, one thread per process. Each
process runs ``train()`` with ``master=tcp://127.0.0.1:<port>``, ``rank`` and
``world_size``, under one of three engines for 2 processes: ``averager``
(torchslim's own bucketed all-reduce from post-accumulate-grad hooks, what ran
before DDP; kept for loose tensors), ``ddp`` (the default:
DistributedDataParallel's reducer) and ``fsdp`` (``sharding="fsdp"``, FSDP2:
all-gather before each layer's forward and backward, reduce-scatter after). The chief's
steady-state seconds per step come from clocks stamped on train_step's log line
every 50 steps (lower quartile of the intervals). Throughput is examples per
second summed over processes; ``scaling`` is throughput(N) / (N x throughput(1)),
1.0 being ideal. Runs of 1 and 2 processes are interleaved, medians over
repeats. On this 2-core machine the 2 processes also share the cores that the
all-reduce uses, so this is a report, not a target; the same script measures a
multi-core or multi-GPU machine.

    .venv/bin/python bench/ddp_scaling.py [--repeats 3] [--steps 300] [--engines averager,ddp,fsdp]
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


def worker(logdir: str, steps: int, rank: int, world_size: int, master: str | None, engine: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from torchslim import distributed
    from torchslim.learning import create_train_op, train

    if engine == "averager":  # the engine's fallback, made the rule for this run: what synchronous runs used before DDP
        distributed.DDPGradients = lambda modules, trained, device: distributed.GradientAverager(trained, world_size)

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
    kwargs: dict = {"master": master, "rank": rank, "world_size": world_size} if world_size > 1 else {}
    if engine == "fsdp":
        kwargs["sharding"] = "fsdp"
    train(op, logdir, loader, number_of_steps=steps, log_every_n_steps=50, summary_op=None, progress_bar=False,
          **kwargs)
    if rank == 0:
        per_step = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
        print(json.dumps({"step_s": statistics.quantiles(per_step, n=4, method="inclusive")[0]}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world_size: int, steps: int, engine: str = "ddp") -> float:
    """Seconds per step on the chief of a run of ``world_size`` processes under ``engine``."""
    master = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as logdir:
        procs = [subprocess.Popen([sys.executable, __file__, logdir, str(steps), str(rank), str(world_size), master,
                                   engine],
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
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated, of %(default)s: how 2 processes combine gradients")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive number, got {args.repeats}")
    if args.steps < 150:
        parser.error(f"--steps must be at least 150 (the clock is read every 50 steps), got {args.steps}")
    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        parser.error(f"--engines must be a comma-separated list of {', '.join(ENGINES)}, got {args.engines!r}")
    configs = [("1 process", 1, "ddp")] + [(f"2, {e}", 2, e) for e in engines]
    runs: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for rep in range(args.repeats):  # interleaved, the order turned around every other repeat
        for name, n, engine in configs if rep % 2 == 0 else configs[::-1]:
            runs[name].append(measure(n, args.steps, engine))
    step_s = {name: statistics.median(runs[name]) for name in runs}
    one = 64 / step_s["1 process"]
    print(f"model M, batch 64 per process, gloo on loopback, 1 thread per process, {os.cpu_count()} cores; "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'run':>14}{'ms/step':>10}{'examples/s':>12}{'of ideal':>10}")
    report: dict[str, dict[str, float]] = {}
    for name, n, _ in configs:
        throughput = n * 64 / step_s[name]
        ratio = throughput / (n * one)
        print(f"{name:>14}{step_s[name] * 1e3:>10.2f}{throughput:>12.0f}{ratio:>10.3f}")
        report[name] = {"step_ms": round(step_s[name] * 1e3, 2), "examples_per_s": round(throughput),
                        "ratio_to_ideal": round(ratio, 3)}
    print(json.dumps(report))


ENGINES = ("averager", "ddp", "fsdp")


if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        logdir, steps, rank, world_size, master, engine = sys.argv[1:7]
        worker(logdir, int(steps), int(rank), int(world_size), master, engine)
    else:
        main()
