"""How fast is a step of ``train()`` in each mode, against a hand-written fp32 eager loop?

Setup (issue 12, point 5): the data and models of ``loop_overhead.py`` (a
``DataLoader`` over a TensorDataset of 8192 x 64 inputs and 10-class labels,
batch 64, shuffled; SGD momentum 0.9; S = Linear(64,128)-ReLU-Linear(128,10),
M = Linear(64,1024)-ReLU-Linear(1024,1024)-ReLU-Linear(1024,10)). The baseline
("raw") is the idiomatic loop ``for x, y in loader: opt.zero_grad(); loss =
F.cross_entropy(model(x), y); loss.backward(); opt.step()``. torchslim's side is
``train(create_train_op(loss_fn, opt, precision=..., compile=...,
accumulate_steps=...), logdir, loader, number_of_steps=N)`` with its defaults,
in the modes: fp32, bf16, compiled, bf16+compiled, and k=4 micro-batches of 16
per update against the raw loop's batch of 64 ("accum4").

Method: every measurement runs in a fresh process, as a user's script would
(nothing set by hand: no allocator variables, no flags; the raw loop gets
glibc's defaults and ``train()`` whatever it sets up itself), one after
another in an order that alternates between repeats. In each process a run of
``--steps`` updates is timed with the wall clock between the end of update
``warmup`` and the end of the last one (so compilation and first-step costs are
left out; the compile time is the first-step log line), and the process's minor
page faults over the same window are counted. Reported per model and mode: the
median over repeats of us per update, of page faults per update, and the median
of the per-repeat ratios against the raw loop of the same repeat. Rows: S and M
at 1 thread, M2 = M at 2 threads. The last line is one JSON object
``{"S": {"raw_us", "fp32_ratio"}, "M": {"raw_us", "fp32_ratio", "bf16_ratio",
"compiled_ratio", "bf16_compiled_ratio", "accum4_ratio"}, "M2": {"raw_us",
"bf16_compiled_ratio"}}``. Targets: S fp32 <= 0.70, M fp32 <= 1.02, M bf16 <= 0.70,
M bf16+compiled <= 0.65, M2 bf16+compiled <= 0.75 (CPUs with native bf16).

    .venv/bin/python bench/step_speed.py [--repeats 5] [--steps 200] [--device cpu|cuda]
        [--only S:raw,S:fp32,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = {  # row -> (model, threads, modes)
    "S": ("S", 1, ["raw", "fp32"]),
    "M": ("M", 1, ["raw", "fp32", "bf16", "compiled", "bf16_compiled", "accum4"]),
    "M2": ("M", 2, ["raw", "bf16_compiled"]),
}
WARMUP = 20


def measure(model_name: str, threads: int, mode: str, steps: int, device: str) -> dict:
    """One process's measurement: us per update and minor page faults per update."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(8192, 64), torch.randint(0, 10, (8192,)))
    batch = 16 if mode == "accum4" else 64
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    widths = (64, 128, 10) if model_name == "S" else (64, 1024, 1024, 10)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    marks: list[tuple[int, float, int]] = []

    def mark(step: int) -> None:
        if step in (WARMUP, WARMUP + steps):
            if device == "cuda":
                torch.cuda.synchronize()  # host sync: only at the two stamps
            marks.append((step, time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    if mode == "raw":
        step = 0
        while step < WARMUP + steps:
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                step += 1
                mark(step)
                if step == WARMUP + steps:
                    break
    else:
        from torchslim.learning import create_train_op, train

        class Stamp(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if isinstance(record.msg, str) and record.msg.startswith("global step"):
                    mark(record.args[0])  # type: ignore[index]

        log = logging.getLogger("torchslim")
        log.setLevel(logging.INFO)
        log.addHandler(Stamp())
        op = create_train_op(lambda b: F.cross_entropy(model(b[0].to(device)), b[1].to(device)), opt,
                             precision="bf16" if "bf16" in mode else "fp32", compile="compiled" in mode,
                             accumulate_steps=4 if mode == "accum4" else 1)
        logdir = tempfile.mkdtemp(prefix="step_speed_")
        try:
            train(op, logdir, loader, number_of_steps=WARMUP + steps, log_every_n_steps=WARMUP if steps % WARMUP == 0
                  else 1, progress_bar=False)
        finally:
            shutil.rmtree(logdir, ignore_errors=True)
    (s0, t0, f0), (s1, t1, f1) = marks[0], marks[-1]
    return {"us": (t1 - t0) / (s1 - s0) * 1e6, "faults": (f1 - f0) / (s1 - s0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="timed updates per process (a multiple of 20)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", default="", help="comma-separated row:mode pairs, e.g. S:raw,S:fp32")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: row:mode, measured in this process
    args = parser.parse_args()
    if args.one:
        row, mode = args.one.split(":")
        model_name, threads, _ = ROWS[row]
        print(json.dumps(measure(model_name, threads, mode, args.steps, args.device)))
        return
    wanted = [(row, mode) for row, (_, _, modes) in ROWS.items() for mode in modes]
    if args.only:
        wanted = [tuple(x.split(":")) for x in args.only.split(",")]  # type: ignore[misc]
    results: dict[tuple[str, str], list[dict]] = {w: [] for w in wanted}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                        os.environ.get("PYTHONPATH", "")])}
    for rep in range(args.repeats):
        for row, mode in wanted if rep % 2 == 0 else wanted[::-1]:  # alternate the order: drift hits all alike
            out = subprocess.run([sys.executable, __file__, "--one", f"{row}:{mode}", "--steps", str(args.steps),
                                  "--device", args.device], capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{row}:{mode} failed:\n{out.stderr[-3000:]}")
            results[(row, mode)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = statistics.median
    print(f"{args.device}, {args.repeats} repeats x {args.steps} timed updates per process; medians")
    print(f"{'row':<5}{'mode':<15}{'us/update':>11}{'faults/update':>15}{'ratio to raw':>14}")
    summary: dict[str, dict[str, float]] = {}
    for (row, mode), runs in results.items():
        raw = results.get((row, "raw"))
        ratio = med(r["us"] / b["us"] for r, b in zip(runs, raw)) if raw else float("nan")
        print(f"{row:<5}{mode:<15}{med(r['us'] for r in runs):>11.1f}{med(r['faults'] for r in runs):>15.1f}"
              f"{ratio:>14.3f}")
        entry = summary.setdefault(row, {})
        if mode == "raw":
            entry["raw_us"] = round(med(r["us"] for r in runs), 1)
        else:
            entry[f"{mode}_ratio"] = round(ratio, 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
