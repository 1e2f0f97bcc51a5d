"""Chaos: a 25 M-parameter run with async saves, killed with SIGKILL 20 times, ends bitwise as an uninterrupted one.

Half the kills land at random moments; the other half inside a chosen phase of
a save (the copy into staging buffers, a write, an fsync, the commit rename,
retention's removal): the trainer marks each phase in a trace file and, for
those runs, pauses 0.3 s inside it so that the kill lands there. After every
kill the restart must restore the newest committed checkpoint, every committed
checkpoint must load, and no temporary directory may be visible. SIGTERM during
an async write must commit the final checkpoint before the process exits.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import wait_until

from torchslim import checkpoint

ROOT = Path(__file__).resolve().parents[1]

TRAINER = textwrap.dedent('''
    import os, sys, time
    import torch
    from torchslim import _asyncsave, _tensorfile, checkpoint, learning, losses

    logdir, target, trace = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pause = float(os.environ.get("CHAOS_PAUSE", "0"))

    def mark(phase):
        with open(trace, "a") as f:
            f.write(phase + "\\n")
        if pause and phase != "step":
            time.sleep(pause)

    def wrap(owner, name, phase):
        real = getattr(owner, name)
        def wrapper(*args, **kwargs):
            p = phase(*args) if callable(phase) else phase
            if p:
                mark(p)
            return real(*args, **kwargs)
        setattr(owner, name, wrapper)

    wrap(_asyncsave.Staging, "copy", "copy")
    wrap(_tensorfile, "_write_all", "write")
    wrap(os, "fsync", "fsync")
    wrap(os, "rename", lambda src, dst: "rename" if ".tmp-" in src else "retention" if ".del-" in dst else None)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = 2880  # three d x d layers: 24.9 M parameters, 0.28 GiB with Adam's state
    model = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, d), torch.nn.Tanh(),
                                torch.nn.Linear(d, d))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, d, generator=g) for _ in range(16)]

    def total_loss(batch):
        mark("step")
        losses.mean_squared_error(model(batch), batch)
        return losses.get_total_loss()

    op = learning.create_train_op(total_loss, optimizer)
    learning.train(op, logdir, data=data, number_of_steps=target, save_interval_steps=2, save_summaries_steps=None,
                   save_summaries_secs=None, progress_bar=False,
                   saver=checkpoint.Saver(max_to_keep=2, async_save=True))
''')

PHASES = ["copy", "write", "fsync", "rename", "retention"]


def start(script, logdir, target, trace, log, pause=0.0):
    trace.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CHAOS_PAUSE": str(pause)}
    return subprocess.Popen([sys.executable, str(script), str(logdir), str(target), str(trace)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def marks(trace):
    return trace.read_text().split()


def final_model(logdir):
    return checkpoint.load(checkpoint.latest_checkpoint(logdir))


@pytest.mark.slow
def test_twenty_kill_9s_at_random_moments_and_inside_each_phase_of_a_save(tmp_path):
    script, trace, logdir = tmp_path / "trainer.py", tmp_path / "trace", tmp_path / "run"
    script.write_text(TRAINER)
    rng = random.Random(13)
    landed = []
    for i in range(20):
        expected = checkpoint.latest_checkpoint(logdir)
        phase = PHASES[(i // 2) % len(PHASES)] if i % 2 else None
        log = tmp_path / f"run-{i}.log"
        proc = start(script, logdir, 10**6, trace, log, pause=0.3 if phase else 0.0)
        try:
            if phase is None:
                wait_until(lambda p=proc: "step" in marks(trace) or p.poll() is not None, "the trainer never stepped",
                           timeout=120)
                time.sleep(rng.uniform(0.0, 2.5))
            else:
                wait_until(lambda p=proc, ph=phase: ph in marks(trace) or p.poll() is not None, f"no {phase} phase",
                           timeout=180)
            assert proc.poll() is None, log.read_text()[-2000:]
            landed.append(phase or (marks(trace) or ["start"])[-1])
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        text = log.read_text()
        if expected is None:
            assert "Restored" not in text
        else:  # the restart restored the newest committed checkpoint, not an older one
            assert f"Restored {expected} " in text, text[-2000:]
        committed = checkpoint.list_checkpoints(logdir)
        assert all(os.path.isfile(os.path.join(p, "state.json")) for p in committed)
        for path in committed:  # none lost or unreadable
            checkpoint.load(path)
        if expected is not None:
            assert checkpoint.step_of(committed[-1]) >= checkpoint.step_of(expected)
    print("kills landed in:", landed)
    # Finish a few steps past the newest checkpoint, and compare with a run that was never interrupted.
    target = checkpoint.step_of(checkpoint.latest_checkpoint(logdir)) + 5
    for directory in (logdir, tmp_path / "uninterrupted"):
        proc = start(script, directory, target, trace, tmp_path / "final.log")
        assert proc.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-2000:]
    interrupted, uninterrupted = final_model(logdir), final_model(tmp_path / "uninterrupted")
    assert interrupted["global_step"] == uninterrupted["global_step"] == target
    for part in ("model", "optimizer"):
        flat_a, flat_b = checkpoint._statetree.encode(interrupted[part])[1], checkpoint._statetree.encode(uninterrupted[part])[1]
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), f"{part} differs from the uninterrupted run"


@pytest.mark.slow
def test_sigterm_during_an_async_write_commits_the_final_checkpoint(tmp_path):
    script, trace, logdir = tmp_path / "trainer.py", tmp_path / "trace", tmp_path / "run"
    script.write_text(TRAINER)
    proc = start(script, logdir, 10**6, trace, tmp_path / "log", pause=0.3)
    wait_until(lambda: marks(trace).count("write") >= 3 or proc.poll() is not None, "no async write", timeout=180)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == -signal.SIGTERM
    steps = marks(trace).count("step")  # a fresh run: one mark per update, so the last global step trained
    latest = checkpoint.latest_checkpoint(logdir)
    assert checkpoint.step_of(latest) == steps, (tmp_path / "log").read_text()[-2000:]  # committed before exit
    assert checkpoint.load(latest)["global_step"] == steps
    assert not [n for n in os.listdir(logdir) if n.startswith(".model.ckpt")]
