"""Checkpoint I/O against its baselines, measured in the same run: blocking save, async stall, load.

States: a model of 100 M (and 25 M) parameters in 50 transformer-shaped tensors
(per block: a square attention-out weight, a 4x MLP up and down weight, a
bias; plus embeddings) with the state of ``torch.optim.Adam`` after one step:
1.12 GiB of float32 for 100 M.

Measured, each a median of ``--repeats`` (alternating ours / baseline):

* ``save_s``: ``Saver.save`` (blocking: written, fsynced, committed by rename),
  against ``save_baseline_s``: ``safetensors.torch.save_file`` of the same
  tensors + fsync of the file. Also the extra resident memory during our save,
  sampled every 2 ms, as a fraction of the state (``save_extra_mem``).
* ``stall_s``: what the step waits for in ``Saver(async_save=True).save`` (the
  staging buffers already allocated by a first save), and ``async_total_s`` until
  the background write is committed; against ``copy_baseline_s``: a plain
  ``copy_`` of every tensor into preallocated buffers.
* ``load_s``: in a fresh process, warm page cache: ``checkpoint.load(path,
  into=live state)`` then the optimizer's ``load_state_dict``, against
  ``load_baseline_s``: ``safetensors.torch.load_file`` + ``copy_`` into the
  model's parameters + the optimizer's ``load_state_dict`` of the file's tensors.
  Each load runs in a fresh process of its own.
* ``load_step_s`` and ``load_step_baseline_s``: the same loads followed by the
  first update (``.grad`` set on every parameter, ``Adam.step()``), in the same
  process: what a resumed run waits for before its first step is done. Both
  sides hand the optimizer's state over as copy-on-write views of the mapped
  file, so the first update pays for copying its pages (and the baseline for
  reading the pages ``load_file`` skipped). ``step_s``: a second update, for scale;
  ``load_verify_s``: the part of ``load_s`` spent checking the checksums.
* ``resume_s`` and ``resume_step_s``: the load as ``train()`` restores
  (``checkpoint.load(..., mmap=False)``: the optimizer's state copied once into
  memory of its own instead of copy-on-write views), alone and with the first
  update; compare ``resume_step_s`` with ``load_step_baseline_s``.
* ``async_step_slowdown``: the time per training step of a small MLP while an
  async save of the state is being written, over its time with nothing in the
  background (2 cores: the write's CPU work competes with the step).

The last line is one JSON object: ``{"100M": {"save_s", "save_baseline_s",
"stall_s", "copy_baseline_s", "load_s", "load_baseline_s", "load_step_s",
"load_step_baseline_s", "resume_s", "resume_step_s", ...}, "25M": {...}}``.

    .venv/bin/python bench/checkpoint_io.py [--repeats 3] [--sizes 25M,100M] [--dir DIR] [--load-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from torchslim import _statetree, checkpoint

PARAMS = {"25M": 25_000_000, "100M": 100_000_000}


def make_model(params: int) -> torch.nn.ParameterDict:
    """50 tensors: 12 blocks of (attention-out d x d, MLP up 4d x d, MLP down d x 4d, bias 4d), 2 embeddings."""
    blocks, vocab = 12, 8192
    # 12 * 9 d^2 + 2 * vocab * d = params  ->  solve for d
    d = int((-(2 * vocab) + ((2 * vocab) ** 2 + 4 * 108 * params) ** 0.5) / (2 * 108))
    g = torch.Generator().manual_seed(0)
    shapes = {"embed": (vocab, d), "unembed": (vocab, d)}
    for i in range(blocks):
        shapes.update({f"b{i}_attn_out": (d, d), f"b{i}_up": (4 * d, d), f"b{i}_down": (d, 4 * d), f"b{i}_bias": (4 * d,)})
    return torch.nn.ParameterDict({k: torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for k, s in shapes.items()})


def make_state(params: int) -> tuple[torch.nn.ParameterDict, torch.optim.Adam]:
    model = make_model(params)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    for p in model.parameters():
        p.grad = None
    return model, opt


def run_state(model: torch.nn.ParameterDict, opt: torch.optim.Adam) -> dict:
    return {"model": {k: v.detach() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PeakRSS:
    """The highest resident set size seen by a 2 ms sampler while the block runs, in bytes over the start."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = self.peak - self.start


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_saves(size: str, root: str, repeats: int) -> dict:
    import safetensors.torch

    model, opt = make_state(PARAMS[size])
    state = run_state(model, opt)
    _, flat = _statetree.encode(state)
    state_bytes = sum(t.numel() * t.element_size() for t in flat.values())
    logdir, base = os.path.join(root, f"ckpt-{size}"), os.path.join(root, f"base-{size}")
    os.makedirs(base, exist_ok=True)
    saver = checkpoint.Saver(max_to_keep=1)
    saves, baselines, extras = [], [], []
    target = os.path.join(base, "tensors.safetensors")

    def baseline() -> None:
        safetensors.torch.save_file({k: v.contiguous() for k, v in flat.items()}, target)
        fsync_path(target)

    for i in range(repeats):
        with PeakRSS() as rss:
            saves.append(timed(lambda i=i: saver.save(state, logdir, i + 1)))
        extras.append(rss.extra / state_bytes)
        baselines.append(timed(baseline))
    # Async: the first save allocates the staging buffers; the later ones reuse them.
    background = checkpoint.Saver(max_to_keep=1, async_save=True)
    background.save(state, logdir, 100)
    background.wait()
    stalls, totals, copies = [], [], []
    buffers = {k: torch.empty_like(v).copy_(v) for k, v in flat.items()}  # allocated and touched once, as staging is
    for i in range(repeats):
        started = time.perf_counter()
        background.save(state, logdir, 101 + i)
        stalls.append(time.perf_counter() - started)
        background.wait()
        totals.append(time.perf_counter() - started)
        copies.append(timed(lambda: [b.copy_(flat[k]) for k, b in buffers.items()]))
    slowdown = step_slowdown(background, state, logdir)
    return {"state_gib": state_bytes / 2**30, "save_s": statistics.median(saves),
            "save_baseline_s": statistics.median(baselines), "save_extra_mem": max(extras),
            "stall_s": statistics.median(stalls), "copy_baseline_s": statistics.median(copies),
            "async_total_s": statistics.median(totals), "async_step_slowdown": slowdown,
            "checkpoint": checkpoint.latest_checkpoint(logdir), "baseline_file": target}


def step_slowdown(saver: checkpoint.Saver, state: dict, logdir: str) -> float:
    """Per-step time of a small MLP while an async save is written, over its time alone."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    x = torch.randn(256, 512)

    def step() -> float:
        started = time.perf_counter()
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        return time.perf_counter() - started

    alone = [step() for _ in range(40)][10:]
    saver.save(state, logdir, 1000)
    during = []
    while saver._writer.in_flight is not None:
        during.append(step())
    saver.wait()
    alone += [step() for _ in range(30)]
    return statistics.median(during) / statistics.median(alone) if during else float("nan")


LOADER = r'''
import json, sys, time, torch, safetensors.torch
sys.path.insert(0, sys.argv[4])
from checkpoint_io import make_state, run_state
from torchslim import _tensorfile, checkpoint
params, path, baseline_file, side = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[5]
verifying = [0.0]  # the part of our load spent checking the chunk checksums
verify = _tensorfile.TensorFile.verify
def timed_verify(self):
    started = time.perf_counter()
    verify(self)
    verifying[0] += time.perf_counter() - started
_tensorfile.TensorFile.verify = timed_verify
model, opt = make_state(params)
opt.state.clear()  # a fresh run: the optimizer has no state until it is restored
grads = [torch.full_like(p, 1e-3) for p in model.parameters()]  # allocated and touched before any timing
for f in (path + "/tensors.safetensors", baseline_file):  # warm page cache: read each once first
    with open(f, "rb") as fh:
        while fh.read(1 << 26):
            pass
started = time.perf_counter()
if side in ("ours", "resume"):  # resume: as train() restores, the optimizer's state in memory of its own
    state = checkpoint.load(path, into=run_state(model, opt), mmap=side == "ours")
    opt.load_state_dict(state["optimizer"])
else:
    tensors = safetensors.torch.load_file(baseline_file)
    with torch.no_grad():
        for k, p in model.items():
            p.copy_(tensors["model/" + k])
    sd = opt.state_dict()
    sd["state"] = {i: {key: tensors[f"optimizer/state/{i}/{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
                   for group in sd["param_groups"] for i in group["params"]}
    opt.load_state_dict(sd)
loaded = time.perf_counter()
assert all(len(s) == 3 for s in opt.state.values()) and len(opt.state) == len(grads), "the optimizer's state was not restored"
# The first update: Adam reads and writes all of its restored state (the baseline's lazily mapped pages too).
for p, g in zip(model.parameters(), grads):
    p.grad = g
opt.step()
stepped = time.perf_counter()
opt.step()  # a second update, nothing left over from the load: what an update costs by itself
print(json.dumps([loaded - started, stepped - started, time.perf_counter() - stepped, verifying[0]]))
'''


def measure_loads(size: str, saved: dict, repeats: int) -> dict:
    """Each load in a fresh process of its own (ours and the baseline's alternating which goes first)."""
    times: dict[str, list[list[float]]] = {"ours": [], "resume": [], "baseline": []}
    here = os.path.dirname(os.path.abspath(__file__))
    for i in range(repeats):
        for side in ("ours", "resume", "baseline") if i % 2 == 0 else ("baseline", "resume", "ours"):
            result = subprocess.run([sys.executable, "-c", LOADER, str(PARAMS[size]), saved["checkpoint"],
                                     saved["baseline_file"], here, side], capture_output=True, text=True, check=True,
                                    env={**os.environ, "PYTHONPATH": os.path.dirname(here)})
            times[side].append(json.loads(result.stdout.strip().splitlines()[-1]))

    def median(side: str, i: int) -> float:
        return statistics.median(t[i] for t in times[side])

    return {"load_s": median("ours", 0), "load_baseline_s": median("baseline", 0),
            "load_step_s": median("ours", 1), "load_step_baseline_s": median("baseline", 1),
            "step_s": statistics.median(t[2] for side in times.values() for t in side),
            "load_verify_s": median("ours", 3), "resume_s": median("resume", 0),
            "resume_step_s": median("resume", 1)}


def write_once(size: str, root: str) -> dict:
    """The checkpoint and the baseline's file, written once, untimed (``--load-only``)."""
    import safetensors.torch

    model, opt = make_state(PARAMS[size])
    state = run_state(model, opt)
    _, flat = _statetree.encode(state)
    path = checkpoint.save(state, os.path.join(root, f"ckpt-{size}", "model.ckpt-1"))
    target = os.path.join(root, f"base-{size}.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in flat.items()}, target)
    return {"state_gib": sum(t.numel() * t.element_size() for t in flat.values()) / 2**30,
            "checkpoint": path, "baseline_file": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="25M,100M")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--load-only", action="store_true",
                        help="measure the loads only (the files are written once, untimed)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="checkpoint_io-", dir=args.dir)
    results = {}
    try:
        for size in args.sizes.split(","):
            saved = write_once(size, root) if args.load_only else measure_saves(size, root, args.repeats)
            saved.update(measure_loads(size, saved, args.repeats))
            results[size] = {k: round(v, 4) for k, v in saved.items() if isinstance(v, float)}
            shutil.rmtree(os.path.join(root, f"ckpt-{size}"), ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, medians of {args.repeats}")
    if not args.load_only:
        print(f"{'state':>6} {'GiB':>5} | {'save':>6} {'base':>6} {'ratio':>5} {'mem':>5} | {'stall':>6} {'copy':>6} "
              f"{'ratio':>5} {'total':>6} {'steps':>5}")
        for size, r in results.items():
            print(f"{size:>6} {r['state_gib']:5.2f} | {r['save_s']:6.3f} {r['save_baseline_s']:6.3f} "
                  f"{r['save_s'] / r['save_baseline_s']:5.2f} {r['save_extra_mem']:5.1%} | {r['stall_s']:6.3f} "
                  f"{r['copy_baseline_s']:6.3f} {r['stall_s'] / r['copy_baseline_s']:5.2f} {r['async_total_s']:6.3f} "
                  f"{r['async_step_slowdown']:5.2f}")
    print(f"{'state':>6} {'GiB':>5} | {'load':>6} {'verify':>6} {'base':>6} {'ratio':>5} | {'load+update':>11} "
          f"{'base':>6} {'ratio':>5} | {'resume':>6} {'+update':>7} {'ratio':>5} | {'update':>6}")
    for size, r in results.items():
        print(f"{size:>6} {r['state_gib']:5.2f} | {r['load_s']:6.3f} {r['load_verify_s']:6.3f} {r['load_baseline_s']:6.3f} "
              f"{r['load_s'] / r['load_baseline_s']:5.2f} | {r['load_step_s']:11.3f} {r['load_step_baseline_s']:6.3f} "
              f"{r['load_step_s'] / r['load_step_baseline_s']:5.2f} | {r['resume_s']:6.3f} {r['resume_step_s']:7.3f} "
              f"{r['resume_step_s'] / r['load_step_baseline_s']:5.2f} | {r['step_s']:6.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
