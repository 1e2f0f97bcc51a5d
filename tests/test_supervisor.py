"""The run's lifecycle across processes: exact resume after kill -9, signals, corrupt checkpoints."""

from __future__ import annotations

import json
import os
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
from torchslim._data import DataStream

ROOT = Path(__file__).resolve().parents[1]

# A deterministic run: a DataLoader shuffling a map-style dataset, dropout, and
# Python/NumPy randomness in the loss, so that every RNG the resume must restore matters.
TRAINER = textwrap.dedent('''
    import os, random, signal, sys
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torchslim import checkpoint, learning, losses

    logdir, target = sys.argv[1], int(sys.argv[2])
    die_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    mark_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    torch.manual_seed(0); random.seed(0); np.random.seed(0)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(200, 8, generator=g)
    labels = torch.randint(0, 3, (200,), generator=g)
    prefetch = os.environ.get("PREFETCH") == "1"
    # With prefetching the shuffle must come from the loader's own generator: the
    # background thread must not draw from the global RNG that dropout uses.
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(2) if prefetch else None)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.9)

    accumulate = int(os.environ.get("ACCUMULATE", "1"))

    def total_loss(batch):
        if op.step == die_at and (accumulate == 1 or op.update_in_progress):  # with k > 1: mid-window
            os.kill(os.getpid(), signal.SIGKILL)
        if op.step == mark_at:
            open(logdir + ".mark", "w").close()
        x, y = batch
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3
        losses.sparse_softmax_cross_entropy(model(x + noise), y)
        return losses.get_total_loss()

    op = learning.create_train_op(total_loss, optimizer, lr_scheduler=scheduler, accumulate_steps=accumulate)
    learning.train(op, logdir, loader, number_of_steps=target if target > 0 else None,
                   save_interval_steps=int(os.environ.get("SAVE_EVERY", "20")), progress_bar=False,
                   prefetch=4 if prefetch else False)
''')


def run_trainer(tmp_path: Path, *args: object, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                            env=full_env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stderr}")
    return result


def final_state(logdir: Path) -> dict:
    return checkpoint.load(checkpoint.latest_checkpoint(logdir))


def assert_bitwise_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def run_once_and_across_a_kill(tmp_path, env):
    """60 steps in one run, and 60 across a kill -9 at step 27 (after the checkpoint at 20): both final states."""
    run_trainer(tmp_path, tmp_path / "once", 60, env=env)
    killed = run_trainer(tmp_path, tmp_path / "twice", 60, 27, env=env, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path / "twice")) == 20
    run_trainer(tmp_path, tmp_path / "twice", 60, env=env)
    once, twice = final_state(tmp_path / "once"), final_state(tmp_path / "twice")
    assert once["global_step"] == twice["global_step"] == 60
    return once, twice


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_exact_resume_across_kill_9_is_bitwise_identical(tmp_path, prefetch):
    # 2N = 60 steps in one run, against 20 + 40 steps across a kill -9 at step 27
    # (after the checkpoint at 20, mid-epoch: 13 batches per epoch).
    env = {"PREFETCH": prefetch}
    once, twice = run_once_and_across_a_kill(tmp_path, env)
    for part in ("model", "optimizer", "lr_scheduler"):
        assert_bitwise_equal(once[part], twice[part], part)
    if prefetch == "1":
        # The background thread snapshots the global RNG at a moment that depends on
        # thread timing; the shuffle does not use it (the loader has its own generator).
        for data in (once["data"], twice["data"]):
            del data["epoch_rng"]["global"]
    assert_bitwise_equal(once["data"], twice["data"], "data")


@pytest.mark.slow
def test_exact_resume_across_a_kill_in_the_middle_of_an_accumulation_window(tmp_path):
    # k=4: 60 updates are 240 batches; the kill comes at the 2nd batch of update 28's window, after the
    # checkpoint at update 20 (batch 80). The resumed run restarts that window from its first batch.
    env = {"ACCUMULATE": "4"}
    once, twice = run_once_and_across_a_kill(tmp_path, env)
    assert (once["data"]["epoch"], once["data"]["batch"]) == (240 // 13, 240 % 13)  # batches, not updates
    for part in ("model", "optimizer", "lr_scheduler", "data"):
        assert_bitwise_equal(once[part], twice[part], part)


def start_endless_trainer(tmp_path: Path, logdir: Path, mark_at: int) -> subprocess.Popen:
    """A trainer with no target and no periodic save, returned once it has reached step ``mark_at``."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAVE_EVERY": "1000000"}
    proc = subprocess.Popen([sys.executable, str(script), str(logdir), "0", "-1", str(mark_at)], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not Path(str(logdir) + ".mark").exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"trainer never reached step {mark_at}"
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_sigterm_saves_a_final_checkpoint_then_ends_the_process(tmp_path):
    logdir = tmp_path / "run"
    proc = start_endless_trainer(tmp_path, logdir, 15)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert "Received SIGTERM" in err
    latest = checkpoint.latest_checkpoint(logdir)
    step = checkpoint.step_of(latest)
    assert step >= 15 and checkpoint.load(latest)["global_step"] == step
    assert checkpoint.read_metadata(latest)["final"] is False  # preempted, not finished
    # The final summary (off the 600 s schedule) carries the step's named losses too.
    records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["tag"] for r in records if r["step"] == step} >= {"total_loss", "losses/sparse_softmax_cross_entropy"}


@pytest.mark.slow
def test_ctrl_c_saves_then_raises_keyboard_interrupt(tmp_path):
    logdir = tmp_path / "run"
    proc = start_endless_trainer(tmp_path, logdir, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert checkpoint.step_of(checkpoint.latest_checkpoint(logdir)) >= 5


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, caplog):
    logdir = tmp_path / "run"
    run_trainer(tmp_path, logdir, 40)  # checkpoints at 20 and 40
    tensors = Path(checkpoint.latest_checkpoint(logdir)) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="model.ckpt-40 is corrupt"):
        checkpoint.load(checkpoint.latest_checkpoint(logdir))
    result = run_trainer(tmp_path, logdir, 45)
    assert "model.ckpt-40 is corrupt" in result.stderr
    assert final_state(logdir)["global_step"] == 45
    # Resumed from 20, not from the corrupt 40: the data position says 25 steps were taken since.
    assert final_state(logdir)["data"]["epoch"] * 13 + final_state(logdir)["data"]["batch"] == 45


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_falls_back(tmp_path):
    logdir = tmp_path / "run"
    run_trainer(tmp_path, logdir, 40)
    tensors = Path(checkpoint.latest_checkpoint(logdir)) / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    result = run_trainer(tmp_path, logdir, 41)
    assert "corrupt" in result.stderr
    assert final_state(logdir)["global_step"] == 41


KILL_DURING_SAVE = textwrap.dedent('''
    import os, signal, sys
    import torch
    from torchslim import checkpoint

    logdir, when = sys.argv[1], sys.argv[2]
    saver = checkpoint.Saver(max_to_keep=2)
    state = lambda step: {"w": torch.full((256, 256), float(step)), "global_step": step}
    saver.save(state(1), logdir, 1)
    saver.save(state(2), logdir, 2)
    from torchslim import _tensorfile
    real_rename = os.rename
    if when == "mid-tensors":
        def write(fd, data):
            os.write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        _tensorfile._write_all = write
    elif when == "before-rename":
        def rename(src, dst):
            if ".tmp-" in src:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
        checkpoint.os.rename = rename
    elif when == "mid-retention":
        def rename(src, dst):
            if ".del-" in dst:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
        checkpoint.os.rename = rename
    saver.save(state(3), logdir, 3)
''')


@pytest.mark.slow
@pytest.mark.parametrize("when, latest", [("mid-tensors", 2), ("before-rename", 2), ("mid-retention", 3)])
def test_kill_9_during_a_checkpoint_write_leaves_a_loadable_latest(tmp_path, when, latest):
    script = tmp_path / "saver.py"
    script.write_text(KILL_DURING_SAVE)
    logdir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(script), str(logdir), when], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    path = checkpoint.latest_checkpoint(logdir)
    assert checkpoint.step_of(path) == latest
    state = checkpoint.load(path)
    assert state["global_step"] == latest and torch.equal(state["w"], torch.full((256, 256), float(latest)))
    # The next save clears the leftovers of the interrupted one.
    checkpoint.Saver(max_to_keep=2).save({"global_step": 4}, logdir, 4)
    assert not [n for n in os.listdir(logdir) if n.startswith(".")]


@pytest.mark.slow
def test_kill_9_at_random_moments_while_saving(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent('''
        import os, sys, torch
        from torchslim import checkpoint
        logdir, started = sys.argv[1], sys.argv[2]
        saver, step = checkpoint.Saver(max_to_keep=3), 0
        while True:
            step += 1
            saver.save({"w": torch.full((512, 512), float(step)), "step": step}, logdir, step)
            if step == 1:
                open(started, "w").close()  # committed once: from now on every kill lands in a later save
    '''))
    logdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for i, delay in enumerate((0.0, 0.013, 0.029, 0.047, 0.11, 0.23)):
        started = tmp_path / f"started-{i}"
        proc = subprocess.Popen([sys.executable, str(script), str(logdir), str(started)], env=env)
        wait_until(lambda p=proc, f=started: f.exists() or p.poll() is not None, "the saver never committed")
        assert proc.poll() is None, "the saver ended by itself"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        path = checkpoint.latest_checkpoint(logdir)
        state = checkpoint.load(path)  # there is one (this process committed one), and it loads
        assert torch.equal(state["w"], torch.full((512, 512), float(state["step"])))
        assert state["step"] == checkpoint.step_of(path)


# ---------------------------------------------------------------- DataStream


def test_data_stream_resumes_mid_epoch_with_the_same_shuffle():
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.arange(20))
    torch.manual_seed(0)
    stream = DataStream(DataLoader(dataset, batch_size=3, shuffle=True))
    it = iter(stream)
    seen = [next(it)[0].tolist() for _ in range(9)]  # 7 batches per epoch: into the second epoch
    state = stream.state_dict()
    rest = [next(it)[0].tolist() for _ in range(6)]
    assert (state["epoch"], state["batch"]) == (1, 2)

    torch.manual_seed(123)  # a new process: the global RNG is elsewhere
    resumed = DataStream(DataLoader(dataset, batch_size=3, shuffle=True))
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert [next(again)[0].tolist() for _ in range(6)] == rest
    assert seen  # the first pass did run


def test_data_stream_with_a_loader_generator_resumes_exactly():
    from torch.utils.data import DataLoader, TensorDataset

    def loader():
        return DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=True,
                          generator=torch.Generator().manual_seed(7))

    stream = DataStream(loader())
    it = iter(stream)
    for _ in range(4):
        next(it)
    state = stream.state_dict()
    expected = [next(it)[0].tolist() for _ in range(4)]
    resumed = DataStream(loader())
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert [next(again)[0].tolist() for _ in range(4)] == expected


def test_data_stream_of_a_one_shot_iterator_ends_when_it_does():
    stream = DataStream(iter(range(5)))
    assert list(stream) == [0, 1, 2, 3, 4]


def test_data_stream_of_none_yields_none_forever():
    it = iter(DataStream(None))
    assert [next(it) for _ in range(3)] == [None, None, None]


def test_sigterm_with_a_python_handler_of_the_users_saves_then_calls_it(tmp_path):
    from conftest import Logistic, batches

    from torchslim.learning import create_train_op, train

    got = []

    def users_handler(signum, frame):
        got.append(signum)

    previous = signal.signal(signal.SIGTERM, users_handler)
    try:
        p = Logistic()

        def total_loss(batch):
            if op.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return p.loss(batch)

        op = create_train_op(total_loss, p.optimizer, model=p.model)
        train(op, tmp_path, batches(), number_of_steps=100, save_summaries_steps=1)
        assert got == [signal.SIGTERM]  # re-delivered to the user's handler after the final save
        assert checkpoint.step_of(checkpoint.latest_checkpoint(tmp_path)) == 4
        assert signal.getsignal(signal.SIGTERM) is users_handler  # train() put it back
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("how", ["logdir is a file", "init_fn raises"])
def test_a_run_that_fails_while_starting_closes_what_it_opened(tmp_path, how):
    # Whatever fails at start, the process's handlers are as they were before the call (Ctrl-C still
    # stops the program) and no thread or open event file is left behind.
    import threading

    from conftest import Logistic, batches

    from torchslim.learning import create_train_op, train

    def users_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, users_handler)
    try:
        before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        threads = set(threading.enumerate())
        p = Logistic()
        op = create_train_op(p.loss, p.optimizer)
        logdir = tmp_path / "run"
        kwargs = {}
        if how == "logdir is a file":
            logdir.write_text("not a directory")
        else:
            kwargs["init_fn"] = lambda: 1 / 0
        with pytest.raises((OSError, ValueError, ZeroDivisionError)):
            train(op, logdir, batches(), number_of_steps=5, progress_bar=True, **kwargs)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        assert set(threading.enumerate()) == threads
        assert op.step == 0
    finally:
        signal.signal(signal.SIGTERM, previous)


QUIET_SCRIPT = textwrap.dedent('''
    import logging, sys
    import torch
    from torchslim import learning, losses
    if sys.argv[2] == "configured":
        logging.basicConfig(level=logging.WARNING)
    if sys.argv[2] == "bar":
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(5)]
    op = learning.create_train_op(lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]),
                                  torch.optim.SGD(model.parameters(), lr=0.1))
    learning.train(op, sys.argv[1], data, number_of_steps=20, log_every_n_steps=5, progress_bar=sys.argv[2] == "bar")
''')


@pytest.mark.slow
@pytest.mark.parametrize("logging_setup", ["none", "configured", "bar"])
def test_log_lines_show_without_logging_set_up_and_never_break_the_progress_bar(tmp_path, logging_setup):
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), logging_setup], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    if logging_setup == "none":  # as absl does: the run is visible without any logging set-up
        assert "torchslim INFO: global step 20: loss =" in err and "torchslim INFO: Saved" in err
    elif logging_setup == "configured":  # the application's choice (warnings only) is respected
        assert "global step" not in err and "Saved" not in err
    else:
        segments = [s for s in err.replace("\r", "\n").split("\n") if "global step" in s]
        assert len(segments) == 4 and all(s.startswith("LOG global step") and "step/s" not in s for s in segments)
        assert "20/20" in err  # the bar was shown
