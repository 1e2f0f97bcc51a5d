"""Does ``prefetch`` hide the data producer behind the step?

Setup (issue 5, point 6): a producer that takes about 5 ms per batch and a step
that takes about 5 ms, both in ``time.sleep`` (which releases the GIL, as I/O
and most torch kernels do). Without prefetching a batch costs producer + step
(about 10 ms); with ``prefetch(producer, depth)`` the producer runs in a
background thread during the step, so a batch should cost about
max(producer, step).

Method. Each repeat times four loops of N batches with ``time.perf_counter``:
the producer alone, the step alone, the plain loop (``for b in producer:
step(b)``) and the prefetched loop (``for b in prefetch(producer): step(b)``,
the thread start and join included). The plain and prefetched loops alternate
their order between repeats (ABBA) so drift hits both; one warm-up repeat is
dropped. Medians over repeats, per batch, in ms. The measured producer and
step times (a 5 ms sleep overshoots by the timer slack) give the denominator:
``ratio = prefetched / max(producer, step)``; target <= 1.15.

The last line printed is one JSON object: ``{"batches", "repeats", "depth",
"producer_ms", "step_ms", "plain_ms", "prefetch_ms", "ratio", "target"}``.

    PYTHONPATH=. .venv/bin/python bench/prefetch_overlap.py [--batches 100] [--repeats 7] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator

from torchslim.queues import prefetch

WORK_SECS = 0.005


def producer(n: int) -> Iterator[int]:
    for i in range(n):
        time.sleep(WORK_SECS)  # stands for decoding / reading a batch
        yield i


def step(batch: int) -> None:
    time.sleep(WORK_SECS)  # stands for the forward/backward/optimizer step


def per_batch_ms(loop: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    loop()
    return (time.perf_counter() - start) / n * 1e3


def one_repeat(n: int, depth: int, plain_first: bool) -> dict[str, float]:
    def plain() -> None:
        for b in producer(n):
            step(b)

    def prefetched() -> None:
        with prefetch(producer(n), depth=depth) as batches:
            for b in batches:
                step(b)

    times = {"producer_ms": per_batch_ms(lambda: [None for _ in producer(n)], n),
             "step_ms": per_batch_ms(lambda: [step(i) for i in range(n)], n)}
    order = [("plain_ms", plain), ("prefetch_ms", prefetched)]
    for key, loop in order if plain_first else order[::-1]:
        times[key] = per_batch_ms(loop, n)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--depth", type=int, default=2)
    args = parser.parse_args()
    one_repeat(args.batches, args.depth, True)  # warm-up: thread start-up paths, sleep timer
    runs = [one_repeat(args.batches, args.depth, r % 2 == 0) for r in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratio = med["prefetch_ms"] / max(med["producer_ms"], med["step_ms"])
    print(f"{args.batches} batches x {args.repeats} repeats, depth {args.depth}; ms per batch")
    print(f"{'':>12} {'median':>8} {'min':>8} {'max':>8}")
    for k in ("producer_ms", "step_ms", "plain_ms", "prefetch_ms"):
        values = [r[k] for r in runs]
        print(f"{k:>12} {med[k]:8.3f} {min(values):8.3f} {max(values):8.3f}")
    print(f"prefetch / max(producer, step) = {ratio:.3f} (target <= 1.15)")
    print(json.dumps({"batches": args.batches, "repeats": args.repeats, "depth": args.depth,
                      **{k: round(v, 3) for k, v in med.items()}, "ratio": round(ratio, 3), "target": 1.15}))


if __name__ == "__main__":
    main()
